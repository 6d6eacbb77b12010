"""DICOMweb (PS3.18): STOW-RS upload and WADO-RS retrieval, mediated by consent."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from api.auth import Signed, member
from ledger.errors import NotAcceptable, UnsupportedMediaType
from ledger.gateway import StowOutcome
from ledger.multipart import build_multipart_related, parse_content_type, parse_multipart_related_bytes

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

PURPOSE_HEADER = "x-medledger-purpose"
BREAK_GLASS_HEADER = "x-medledger-break-glass"

# PS3.4 / PS3.18 failure reasons for the Failed SOP Sequence.
_FAILURE_REASON = {
    "sop_instance_conflict": 0x0111,  # duplicate SOP instance
    "payload_too_large": 0xA700,  # out of resources
    "not_custodian": 0x0124,  # refused: not authorized
    "patient_mismatch": 0xA900,  # data set does not match SOP class / study
}
_CANNOT_UNDERSTAND = 0xC000


def _ds_item(cls: str, uid: str) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [cls]} if cls else {"vr": "UI"},
        "00081155": {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"},
    }


def stow_response(base: str, outcome: StowOutcome) -> JSONResponse:
    body: dict[str, Any] = {}
    if outcome.stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    **_ds_item(s["sop_class_uid"], s["sop_instance_uid"]),
                    "00081190": {
                        "vr": "UR",
                        "Value": [
                            f"{base}/dicomweb/studies/{s['study_instance_uid']}/series/{s['series_instance_uid']}"
                            f"/instances/{s['sop_instance_uid']}"
                        ],
                    },
                }
                for s in outcome.stored
            ],
        }
    if outcome.failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    **_ds_item(f.get("sop_class_uid", ""), f.get("sop_instance_uid", "")),
                    "00081197": {"vr": "US", "Value": [_FAILURE_REASON.get(f["reason"], _CANNOT_UNDERSTAND)]},
                    "00000902": {"vr": "LO", "Value": [f"{f['reason']}: {f['message']}"[:64]]},
                }
                for f in outcome.failed
            ],
        }
    status = 200 if not outcome.failed else (202 if outcome.stored else 409)
    headers = {"X-MedLedger-CIDs": ",".join(s["cid"] for s in outcome.stored)}
    return JSONResponse(body, status_code=status, media_type="application/dicom+json", headers=headers)


@router.post("/studies", summary="STOW-RS: store instances (multipart/related; type=application/dicom)")
async def stow(request: Request, signed: Signed = Depends(member("hospital"))) -> JSONResponse:
    ctype = request.headers.get("content-type", "")
    mime, params = parse_content_type(ctype) if ctype else ("", {})
    if mime != "multipart/related":
        raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(f"only application/dicom parts are accepted, not {part_type}")
    boundary = params.get("boundary")
    if not boundary:
        from ledger.errors import InvalidInput

        raise InvalidInput("the multipart/related content type has no boundary")
    parts = parse_multipart_related_bytes(signed.body, boundary)
    datas: list[bytes] = []
    for p in parts:
        pt = p.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if pt != "application/dicom":
            raise UnsupportedMediaType(f"part of type {pt} is not application/dicom")
        datas.append(p.data)
    assert signed.caller is not None
    outcome = await signed.gateway.store_instances(signed.caller, signed.ctx, datas)
    return stow_response(str(request.base_url).rstrip("/"), outcome)


def _wants_single(request: Request) -> bool:
    accept = request.headers.get("accept", "*/*")
    kinds = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    if any(k in ("multipart/related", "*/*", "multipart/*") for k in kinds):
        return False
    if "application/dicom" in kinds:
        return True
    raise NotAcceptable('acceptable: multipart/related; type="application/dicom" or application/dicom')


def _dicom_response(datas: list[bytes], single: bool, request_id: str) -> Response:
    headers = {"X-Request-Id": request_id}
    if single and len(datas) == 1:
        return Response(datas[0], media_type="application/dicom", headers=headers)
    body, ctype = build_multipart_related(
        [({"Content-Type": "application/dicom"}, d) for d in datas], "application/dicom"
    )
    return Response(body, headers={**headers, "Content-Type": ctype})


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve one instance")
async def retrieve_instance(
    study: str, series: str, sop: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    single = _wants_single(request)
    row = signed.gateway.find_instance(study, series, sop)
    assert signed.caller is not None
    datas = await signed.gateway.retrieve(
        signed.caller,
        signed.ctx,
        [row],
        request.headers.get(PURPOSE_HEADER, ""),
        request.headers.get(BREAK_GLASS_HEADER),
    )
    return _dicom_response(datas, single, signed.ctx.request_id)


@router.get("/studies/{study}", summary="WADO-RS: retrieve a whole study")
async def retrieve_study(
    study: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    _wants_single(request)
    rows = signed.gateway.find_study(study)
    assert signed.caller is not None
    datas = await signed.gateway.retrieve(
        signed.caller,
        signed.ctx,
        rows,
        request.headers.get(PURPOSE_HEADER, ""),
        request.headers.get(BREAK_GLASS_HEADER),
    )
    return _dicom_response(datas, False, signed.ctx.request_id)
