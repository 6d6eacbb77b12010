"""DICOMweb (PS3.18): STOW-RS, WADO-RS and QIDO-RS, every one mediated by consent and audited.

Resources (all under ``/dicomweb``; every request is signed, see `api.auth`):

==========================================================  ========================================
``POST /studies``                                           STOW-RS store instances
``GET /studies/{s}[/series/{se}[/instances/{o}]]``          WADO-RS retrieve study/series/instance
``GET .../metadata`` (each of the three levels)             WADO-RS metadata (application/dicom+json)
``GET /studies/{s}/series/{se}/instances/{o}/bulkdata/{t}`` WADO-RS bulk data of a top-level element
``GET /studies``, ``/series``, ``/instances``,              QIDO-RS searches
``/studies/{s}/series``, ``/studies/{s}/instances``,
``/studies/{s}/series/{se}/instances``
==========================================================  ========================================

Reads and searches take the purpose of use in ``X-MedLedger-Purpose`` (required for reads;
for searches, without it only the caller's own studies are found) and break-glass reads a
justification in ``X-MedLedger-Break-Glass``. Purpose HRESCH returns de-identified copies
only (`ledger.research`). Representation rules: `ledger.wado` (Accept and transfer syntax)
and `ledger.qido` (matching and results). A search with no match answers 204 No Content
(PS3.18 8.3.4.4.1 as currently published).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.auth import Signed, member
from ledger.catalog import StoredInstance
from ledger.errors import InvalidInput, MedLedgerError, NotAcceptable, UnknownInstance, UnsupportedMediaType
from ledger.gateway import StowOutcome
from ledger.multipart import (
    aiter_multipart_related,
    build_multipart_related,
    parse_content_type,
    parse_multipart_related_bytes,
)
from ledger.research import RESEARCH_PURPOSE
from ledger.wado import Plan, bulk_parts, metadata_json, negotiate, negotiate_json, parse_accept, transcode

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

PURPOSE_HEADER = "x-medledger-purpose"
BREAK_GLASS_HEADER = "x-medledger-break-glass"

# Failure Reason (0008,1197) values (PS3.18 10.5.3; PS3.4 B.2.3 and PS3.7 C).
_FAILURE_REASON = {
    "sop_instance_conflict": 0x0111,  # duplicate SOP instance
    "payload_too_large": 0xA700,  # refused: out of resources
    "not_custodian": 0x0124,  # refused: not authorized
    "patient_mismatch": 0xA900,  # data set does not match the study it claims
    "dicom_unknown_transfer_syntax": 0xC122,  # referenced transfer syntax not supported
    "store_unavailable": 0x0110,  # processing failure
    "chain_error": 0x0110,
}
_CANNOT_UNDERSTAND = 0xC000


def _ds_item(cls: str, uid: str) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [cls]} if cls else {"vr": "UI"},
        "00081155": {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"},
    }


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def stow_response(base: str, outcome: StowOutcome) -> JSONResponse:
    """The Store Instances Response (PS3.18 10.5.3): 200 all stored, 202 some, 409 none."""
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
                    # Error Comment: not in the standard's response module; kept for callers
                    # that show the reason (PHI-free reason code and message).
                    "00000902": {"vr": "LO", "Value": [f"{f['reason']}: {f['message']}"[:64]]},
                }
                for f in outcome.failed
            ],
        }
    if outcome.stored:
        study_uids = {s["study_instance_uid"] for s in outcome.stored}
        if len(study_uids) == 1:
            body["00081190"] = {"vr": "UR", "Value": [f"{base}/dicomweb/studies/{study_uids.pop()}"]}
    status = 200 if not outcome.failed else (202 if outcome.stored else 409)
    headers = {"X-MedLedger-CIDs": ",".join(s["cid"] for s in outcome.stored)}
    return JSONResponse(
        dict(sorted(body.items())), status_code=status, media_type="application/dicom+json", headers=headers
    )


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


# ---- WADO-RS -------------------------------------------------------------------------------
def _purpose(request: Request) -> str:
    return request.headers.get(PURPOSE_HEADER, "").strip()


async def _rows(
    signed: Signed, request: Request, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    assert signed.caller is not None
    return await asyncio.to_thread(
        signed.gateway.find_rows, signed.caller, _purpose(request), study, series, sop
    )


def _authorize_or(signed: Signed, request: Request, rows: list[StoredInstance], err: MedLedgerError) -> None:
    """Raise the consent refusal if there is one (it takes precedence over `err`), else `err`."""
    assert signed.caller is not None
    from ledger.events import Action

    signed.ctx.action = Action.VIEW
    signed.gateway.authorize_read(
        signed.caller, signed.ctx, rows[0], _purpose(request), request.headers.get(BREAK_GLASS_HEADER)
    )
    raise err


async def _read(signed: Signed, request: Request, rows: list[StoredInstance]) -> list[bytes]:
    assert signed.caller is not None
    return await signed.gateway.retrieve(
        signed.caller, signed.ctx, rows, _purpose(request), request.headers.get(BREAK_GLASS_HEADER)
    )


async def _retrieve_dicom(signed: Signed, request: Request, rows: list[StoredInstance]) -> Response:
    try:
        plan: Plan = negotiate(
            request.headers.get("accept"), [r.transfer_syntax_uid for r in rows], single_allowed=True
        )
    except NotAcceptable as err:
        _authorize_or(signed, request, rows, err)
        raise
    if _purpose(request) != RESEARCH_PURPOSE and all(
        r.transfer_syntax_uid == ts for r, ts in zip(rows, plan.targets, strict=True)
    ):
        return await _stream_dicom(signed, request, rows, plan)
    datas = await _read(signed, request, rows)
    parts = await asyncio.to_thread(
        lambda: [
            (transcode(d, r.transfer_syntax_uid, ts), ts)
            for d, r, ts in zip(datas, rows, plan.targets, strict=True)
        ]
    )
    headers = {"X-Request-Id": signed.ctx.request_id}
    if not plan.multipart:
        data, ts = parts[0]
        return Response(data, headers={**headers, "Content-Type": f"application/dicom; transfer-syntax={ts}"})
    body, ctype = build_multipart_related(
        [({"Content-Type": f"application/dicom; transfer-syntax={ts}"}, d) for d, ts in parts],
        "application/dicom",
    )
    return Response(body, headers={**headers, "Content-Type": ctype})


async def _stream_dicom(signed: Signed, request: Request, rows: list[StoredInstance], plan: Plan) -> Response:
    """The stored bytes, streamed (memory does not grow with the objects' sizes).

    Byte-identical to the buffered response (same framing and Content-Length). The VIEW events
    are recorded by `Gateway.retrieve_streams` before the response starts; an integrity failure
    part way records a FAILED event and aborts the connection (see its docstring).
    """
    assert signed.caller is not None
    streams = await signed.gateway.retrieve_streams(
        signed.caller, signed.ctx, rows, _purpose(request), request.headers.get(BREAK_GLASS_HEADER)
    )
    headers = {"X-Request-Id": signed.ctx.request_id}
    if not plan.multipart:
        return StreamingResponse(
            streams[0],
            headers={
                **headers,
                "Content-Type": f"application/dicom; transfer-syntax={plan.targets[0]}",
                "Content-Length": str(rows[0].size),
            },
        )
    ctype, length, body = aiter_multipart_related(
        [
            ({"Content-Type": f"application/dicom; transfer-syntax={ts}"}, r.size, s)
            for r, ts, s in zip(rows, plan.targets, streams, strict=True)
        ],
        "application/dicom",
    )
    return StreamingResponse(body, headers={**headers, "Content-Type": ctype, "Content-Length": str(length)})


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve one instance")
async def retrieve_instance(
    study: str, series: str, sop: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _retrieve_dicom(signed, request, await _rows(signed, request, study, series, sop))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
async def retrieve_series(
    study: str, series: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _retrieve_dicom(signed, request, await _rows(signed, request, study, series))


@router.get("/studies/{study}", summary="WADO-RS: retrieve a whole study")
async def retrieve_study(
    study: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _retrieve_dicom(signed, request, await _rows(signed, request, study))


async def _metadata(signed: Signed, request: Request, rows: list[StoredInstance]) -> Response:
    try:
        media = negotiate_json(request.headers.get("accept"))
    except NotAcceptable as err:
        _authorize_or(signed, request, rows, err)
        raise
    datas = await _read(signed, request, rows)
    base = _base(request)

    def build() -> list[dict[str, Any]]:
        import pydicom

        out = []
        for d in datas:
            ds = pydicom.dcmread(io.BytesIO(d))
            url = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            out.append(metadata_json(ds, url))
        return out

    items = await asyncio.to_thread(build)
    return Response(
        json.dumps(items, ensure_ascii=False).encode(),
        media_type=media,
        headers={"X-Request-Id": signed.ctx.request_id},
    )


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study (DICOM JSON)")
async def study_metadata(
    study: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _metadata(signed, request, await _rows(signed, request, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
async def series_metadata(
    study: str, series: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _metadata(signed, request, await _rows(signed, request, study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata", summary="WADO-RS: metadata of an instance"
)
async def instance_metadata(
    study: str, series: str, sop: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _metadata(signed, request, await _rows(signed, request, study, series, sop))


def _bulk_acceptable(accept: str | None) -> bool:
    for r in parse_accept(accept):
        if r.q > 0 and r.mime in ("*/*", "multipart/*", "multipart/related"):
            return True
    return False


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}",
    summary="WADO-RS: the bulk data of a top-level element (as named by a BulkDataURI)",
)
async def bulkdata(
    study: str,
    series: str,
    sop: str,
    tag: str,
    request: Request,
    signed: Signed = Depends(member("hospital")),
) -> Response:
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        raise InvalidInput("the bulk data tag must be 8 hexadecimal digits")
    rows = await _rows(signed, request, study, series, sop)
    if not _bulk_acceptable(request.headers.get("accept")):
        _authorize_or(signed, request, rows, NotAcceptable("acceptable here: multipart/related or */*"))
    datas = await _read(signed, request, rows)
    parts = await asyncio.to_thread(bulk_parts, datas[0], int(tag, 16))
    if not parts:
        raise UnknownInstance("this instance has no bulk data element with this tag", code="unknown_bulkdata")
    body, ctype = build_multipart_related(
        [({"Content-Type": ct}, d) for ct, d in parts], parts[0][0].split(";")[0]
    )
    return Response(body, headers={"Content-Type": ctype, "X-Request-Id": signed.ctx.request_id})


# ---- QIDO-RS -------------------------------------------------------------------------------
async def _search(
    signed: Signed, request: Request, level: str, study: str | None = None, series: str | None = None
) -> Response:
    media = negotiate_json(request.headers.get("accept"))
    assert signed.caller is not None
    results, warnings = await asyncio.to_thread(
        signed.gateway.query,
        signed.caller,
        signed.ctx,
        level,
        list(request.query_params.multi_items()),
        _purpose(request),
        _base(request),
        study,
        series,
    )
    headers = {"X-Request-Id": signed.ctx.request_id}
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    if not results:
        return Response(status_code=204, headers=headers)
    return Response(json.dumps(results, ensure_ascii=False).encode(), media_type=media, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
async def search_studies(request: Request, signed: Signed = Depends(member("hospital"))) -> Response:
    return await _search(signed, request, "study")


@router.get("/series", summary="QIDO-RS: search for series (all studies)")
async def search_all_series(request: Request, signed: Signed = Depends(member("hospital"))) -> Response:
    return await _search(signed, request, "series")


@router.get("/instances", summary="QIDO-RS: search for instances (all studies)")
async def search_all_instances(request: Request, signed: Signed = Depends(member("hospital"))) -> Response:
    return await _search(signed, request, "instance")


@router.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
async def search_series(
    study: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _search(signed, request, "series", study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
async def search_study_instances(
    study: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _search(signed, request, "instance", study)


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for instances of a series")
async def search_instances(
    study: str, series: str, request: Request, signed: Signed = Depends(member("hospital"))
) -> Response:
    return await _search(signed, request, "instance", study, series)
