"""Request authentication: the EIP-712 signature of every request (see `ledger.reqsig`)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from ledger.errors import PayloadTooLarge
from ledger.gateway import Caller, Gateway, RequestContext
from ledger.reqsig import precheck_headers, verify_request

# Every endpoint but STOW-RS takes small JSON bodies (or none).
JSON_BODY_LIMIT = 1024 * 1024


@dataclass
class Signed:
    """An authenticated request: who signed it, its body, and its audit context."""

    signer: str
    body: bytes
    ctx: RequestContext
    gateway: Gateway
    caller: Caller | None = None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def authenticate(request: Request) -> Signed:
    gateway: Gateway = request.app.state.gateway
    ctx = RequestContext()
    request.state.ctx = ctx
    headers = {k.lower(): v for k, v in request.headers.items()}
    precheck_headers(headers)  # before reading any body: unsigned or stale requests buffer nothing
    is_upload = request.method == "POST" and request.url.path.rstrip("/") == "/dicomweb/studies"
    body = await read_body(request, gateway.config.max_upload_bytes if is_upload else JSON_BODY_LIMIT)
    verified = verify_request(
        gateway.request_domain,
        request.method,
        request.url.path,
        request.url.query,
        hashlib.sha256(body).digest(),
        headers,
    )
    ctx.signer = verified.signer
    await asyncio.to_thread(gateway.check_replay, verified)
    return Signed(signer=verified.signer, body=body, ctx=ctx, gateway=gateway)


def member(*roles: str) -> Callable[[Request], Awaitable[Signed]]:
    """Dependency: a signed request from an active member holding one of `roles`."""

    async def dependency(request: Request) -> Signed:
        signed = await authenticate(request)
        signed.caller = await asyncio.to_thread(signed.gateway.member_caller, signed.signer, roles)
        signed.ctx.caller = signed.caller
        return signed

    return dependency


async def patient(request: Request) -> Signed:
    """Dependency: a signed request from the patient of `{patient_ref}` (or a delegate)."""
    signed = await authenticate(request)
    ref = str(request.path_params.get("patient_ref", "")).lower()
    signed.ctx.patient_ref = ref
    signed.caller = await asyncio.to_thread(signed.gateway.patient_caller, signed.signer, ref)
    signed.ctx.caller = signed.caller
    return signed
