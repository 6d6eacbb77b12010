"""Patients, consent, sharing, audit and governance endpoints (JSON over signed requests)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from api.auth import Signed, member, patient
from ledger.errors import InvalidInput

router = APIRouter()
M = TypeVar("M", bound=BaseModel)

HEX32 = r"^0x[0-9a-fA-F]{64}$"
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
SIG = r"^0x[0-9a-fA-F]{130}$"
U64 = 2**64  # the contracts' uint64 fields (times, values)
U256 = 2**256  # uint256 fields (nonces)


def parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()[:5])
        raise InvalidInput(f"invalid or missing fields: {fields}") from None


class PatientLookup(BaseModel):
    patient_id: str = Field(min_length=1, max_length=64)
    issuer: str = Field(default="", max_length=64)


class Enrollment(BaseModel):
    patient_key: str = Field(pattern=ADDRESS)
    deadline: int = Field(ge=0, lt=U64)
    signature: str = Field(pattern=SIG)


class GrantBody(BaseModel):
    grantee: str = Field(pattern=HEX32)
    study_ref: str | None = Field(default=None, pattern=HEX32)
    purposes: list[str] = Field(min_length=1)
    not_before: int = Field(ge=0, lt=U64)
    not_after: int = Field(ge=0, lt=U64)
    nonce: int = Field(ge=0, lt=U256)
    signature: str = Field(pattern=SIG)


class KeyRotationBody(BaseModel):
    new_key: str = Field(pattern=ADDRESS)
    nonce: int = Field(ge=0, lt=U256)
    signature: str = Field(pattern=SIG)


class DelegateBody(BaseModel):
    delegate: str = Field(pattern=ADDRESS)
    until: int = Field(ge=0, lt=U64)  # unix seconds; 0 (or any past time) removes the delegate
    nonce: int = Field(ge=0, lt=U256)
    signature: str = Field(pattern=SIG)


class RevokeBody(BaseModel):
    nonce: int = Field(ge=0, lt=U256)
    signature: str = Field(pattern=SIG)


class ShareBody(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64)
    recipient: str = Field(pattern=HEX32)
    purpose: str


class ProposeBody(BaseModel):
    action: str
    member_id: str = Field(pattern=HEX32)
    key: str | None = Field(default=None, pattern=ADDRESS)
    role: str = "none"
    name: str = Field(default="", max_length=128)
    value: int = Field(default=0, ge=0, lt=U64)
    deadline: int = Field(ge=0, lt=U64)
    nonce: int = Field(ge=0, lt=U256)
    signature: str = Field(pattern=SIG)


class ApproveBody(BaseModel):
    signature: str = Field(pattern=SIG)


def _caller(s: Signed) -> Any:
    assert s.caller is not None
    return s.caller


# ---- patients -----------------------------------------------------------------------------
@router.post("/patients/lookup", tags=["patients"], summary="The patientRef of a patient ID (created if new)")
async def lookup(signed: Signed = Depends(member("hospital"))) -> dict[str, Any]:
    body = parse(PatientLookup, signed.body)
    ref = await asyncio.to_thread(
        signed.gateway.lookup_patient, _caller(signed), signed.ctx, body.issuer, body.patient_id
    )
    return {"patient_ref": ref}


@router.post(
    "/patients/{patient_ref}/enrollment",
    tags=["patients"],
    summary="Relay a hospital's attestation of a patient's key",
)
async def enroll(patient_ref: str, signed: Signed = Depends(member("hospital"))) -> dict[str, Any]:
    body = parse(Enrollment, signed.body)
    return await asyncio.to_thread(
        signed.gateway.enroll,
        _caller(signed),
        signed.ctx,
        patient_ref.lower(),
        body.patient_key,
        body.deadline,
        body.signature,
    )


@router.get(
    "/patients/{patient_ref}", tags=["patients"], summary="The patient's key, nonce, studies and consents"
)
async def patient_info(patient_ref: str, signed: Signed = Depends(patient)) -> dict[str, Any]:
    return await asyncio.to_thread(
        signed.gateway.patient_info, _caller(signed), signed.ctx, patient_ref.lower()
    )


@router.get(
    "/patients/{patient_ref}/history",
    tags=["patients"],
    summary="Who accessed my images, when, why, and the proofs",
)
async def history(patient_ref: str, signed: Signed = Depends(patient)) -> dict[str, Any]:
    return await asyncio.to_thread(signed.gateway.history, _caller(signed), signed.ctx, patient_ref.lower())


@router.post(
    "/patients/{patient_ref}/consents",
    tags=["consent"],
    summary="Relay a consent grant signed by the patient",
)
async def grant(patient_ref: str, signed: Signed = Depends(patient)) -> dict[str, Any]:
    body = parse(GrantBody, signed.body)
    g = body.model_dump()
    g["patient_ref"] = patient_ref.lower()
    return await asyncio.to_thread(signed.gateway.grant, _caller(signed), signed.ctx, g, body.signature)


@router.post(
    "/patients/{patient_ref}/key-rotation",
    tags=["patients"],
    summary="Relay the patient's key rotation, signed with the current key",
)
async def rotate_key(patient_ref: str, signed: Signed = Depends(patient)) -> dict[str, Any]:
    from eth_utils import to_checksum_address

    body = parse(KeyRotationBody, signed.body)
    return await asyncio.to_thread(
        signed.gateway.rotate_patient_key,
        _caller(signed),
        signed.ctx,
        patient_ref.lower(),
        to_checksum_address(body.new_key),
        body.nonce,
        body.signature,
    )


@router.post(
    "/patients/{patient_ref}/delegates",
    tags=["patients"],
    summary="Relay the patient's appointment (or removal) of a delegate",
)
async def set_delegate(patient_ref: str, signed: Signed = Depends(patient)) -> dict[str, Any]:
    from eth_utils import to_checksum_address

    body = parse(DelegateBody, signed.body)
    return await asyncio.to_thread(
        signed.gateway.set_delegate,
        _caller(signed),
        signed.ctx,
        patient_ref.lower(),
        to_checksum_address(body.delegate),
        body.until,
        body.nonce,
        body.signature,
    )


@router.post(
    "/patients/{patient_ref}/consents/{consent_id}/revoke",
    tags=["consent"],
    summary="Relay a revocation signed by the patient",
)
async def revoke(patient_ref: str, consent_id: int, signed: Signed = Depends(patient)) -> dict[str, Any]:
    body = parse(RevokeBody, signed.body)
    if not 0 < consent_id < U256:
        raise InvalidInput("consent ids are positive integers", code="unknown_consent")
    c = signed.gateway.index.consents.get(consent_id)
    if c is None or c.patient_ref != patient_ref.lower():
        raise InvalidInput("no such consent for this patient", code="unknown_consent")
    return await asyncio.to_thread(
        signed.gateway.revoke, _caller(signed), signed.ctx, consent_id, body.nonce, body.signature
    )


# ---- sharing --------------------------------------------------------------------------------
@router.post("/shares", tags=["sharing"], summary="Share a study with another member for a purpose")
async def share(signed: Signed = Depends(member("hospital"))) -> dict[str, Any]:
    body = parse(ShareBody, signed.body)
    return await asyncio.to_thread(
        signed.gateway.share,
        _caller(signed),
        signed.ctx,
        body.study_instance_uid,
        body.recipient,
        body.purpose,
    )


# ---- audit ------------------------------------------------------------------------------------
@router.get("/audit/verify", tags=["audit"], summary="Verify the whole log against the chain")
async def verify(signed: Signed = Depends(member("auditor"))) -> JSONResponse:
    report = await asyncio.to_thread(signed.gateway.verify, _caller(signed), signed.ctx)
    return JSONResponse(report.to_dict())


@router.get(
    "/audit/events", tags=["audit"], summary="The audit log as JSON lines (from_seq: from that event on)"
)
async def events(from_seq: int = 0, signed: Signed = Depends(member("auditor"))) -> Response:
    if not 0 <= from_seq < 2**63:
        raise InvalidInput("from_seq must be a non-negative sequence number")
    rows = await asyncio.to_thread(signed.gateway.export_events, _caller(signed), signed.ctx, from_seq)
    import json

    return Response(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), media_type="application/x-ndjson"
    )


@router.get(
    "/audit/export",
    tags=["audit"],
    summary="The audit log exported: jsonl (verifiable, with proofs), fhir (R4 AuditEvent NDJSON), "
    "dicom-xml (DICOM audit messages) or csv",
)
async def export(format: str = "jsonl", signed: Signed = Depends(member("auditor"))) -> Response:
    data, media_type = await asyncio.to_thread(signed.gateway.export, _caller(signed), signed.ctx, format)
    return Response(data, media_type=media_type)


# ---- directory and governance --------------------------------------------------------------------
@router.get("/members", tags=["governance"], summary="The consortium's members")
async def members(request: Request) -> list[dict[str, Any]]:
    from api.auth import authenticate

    signed = await authenticate(request)
    gw = signed.gateway
    m = gw.index.member_by_key(signed.signer)
    if m is not None:
        signed.ctx.caller = gw.member_caller(signed.signer, ())
    elif not gw.index.acts_for_any_patient(signed.signer):  # a patient's key or current delegate
        from ledger.errors import NotAMember

        raise NotAMember("only members and enrolled patients may list members")
    return await asyncio.to_thread(gw.members)


@router.post("/governance/proposals", tags=["governance"], summary="Relay an admin's membership proposal")
async def propose(signed: Signed = Depends(member("admin"))) -> dict[str, Any]:
    body = parse(ProposeBody, signed.body)
    return await asyncio.to_thread(signed.gateway.propose, _caller(signed), signed.ctx, body.model_dump())


@router.post(
    "/governance/proposals/{proposal_id}/approvals", tags=["governance"], summary="Relay an admin's approval"
)
async def approve(proposal_id: int, signed: Signed = Depends(member("admin"))) -> dict[str, Any]:
    body = parse(ApproveBody, signed.body)
    if not 0 < proposal_id < U256:
        raise InvalidInput("proposal ids are positive integers")
    return await asyncio.to_thread(
        signed.gateway.approve, _caller(signed), signed.ctx, proposal_id, body.signature
    )


@router.get("/governance/nonces/{address}", tags=["governance"], summary="An admin's next proposal nonce")
async def admin_nonce(address: str, signed: Signed = Depends(member("admin"))) -> dict[str, Any]:
    import re

    from eth_utils import to_checksum_address

    if re.fullmatch(ADDRESS, address) is None:
        raise InvalidInput("the address must be 0x followed by 40 hex digits")
    c = signed.gateway.chain.contract("Membership")
    nonce = await asyncio.to_thread(lambda: int(c.functions.nonces(to_checksum_address(address)).call()))
    return {"address": address, "nonce": nonce}
