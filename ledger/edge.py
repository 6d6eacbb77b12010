"""The hospital's edge proxy: plain DICOMweb in, signed DICOMweb out.

PACS, viewers and Orthanc speak plain DICOMweb and cannot sign requests. The edge runs inside
the hospital's trust boundary (by default on loopback), holds the hospital's member key and
forwards every request under ``/dicomweb/`` to the gateway, signed with that key
(:class:`ledger.client.MedLedgerAuth`). Reads that carry no ``X-MedLedger-Purpose`` get the
configured default purpose. The gateway still decides and audits every request: the edge only
authenticates on the hospital's behalf, so whoever can reach the edge acts as the hospital —
keep it on loopback or behind the hospital's own access control.

Request bodies are read whole (the signature covers their hash, and the gateway reads them
whole too), bounded by ``max_body``; responses are streamed through as they arrive.

``medledger edge`` runs it, optionally with the DIMSE C-STORE SCP (:mod:`ledger.dimse`) in the
same process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ledger.chain import load_account
from ledger.client import MedLedgerAuth
from ledger.errors import InvalidInput
from ledger.multipart import new_boundary
from ledger.purposes import BREAK_GLASS, purposes_mask
from ledger.reqsig import domain_separator

log = logging.getLogger("medledger.edge")

PURPOSE_HEADER = "x-medledger-purpose"
DEFAULT_MAX_BODY = 512 * 1024 * 1024

# Request headers passed on to the gateway; everything else (Host, Authorization, cookies,
# hop-by-hop headers, any client-supplied signature) is dropped.
_FORWARD_REQUEST = {"accept", "content-type", "x-medledger-purpose", "x-medledger-break-glass"}
# Response headers passed back to the client.
_FORWARD_RESPONSE = {
    "content-type",
    "content-length",
    "content-encoding",
    "content-location",
    "warning",
    "x-request-id",
    "x-medledger-cids",
}


@dataclass
class EdgeConfig:
    gateway_url: str
    private_key: bytes
    purpose: str | None = None  # default X-MedLedger-Purpose for reads
    max_body: int = DEFAULT_MAX_BODY
    timeout: float = 300.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gateway_domain(gateway_url: str, timeout: float) -> bytes:
    info = httpx.get(gateway_url.rstrip("/") + "/info", timeout=timeout)
    info.raise_for_status()
    data: dict[str, Any] = info.json()
    return domain_separator(int(data["chain_id"]), str(data["contracts"]["Membership"]))


def create_edge_app(config: EdgeConfig, *, separator: bytes | None = None) -> Starlette:
    """The edge ASGI app. The request domain is read from the gateway's /info unless given."""
    if config.purpose is not None:
        purposes_mask([config.purpose])  # an unknown purpose code fails here, not per request
        if config.purpose == BREAK_GLASS:
            raise InvalidInput("break-glass (ETREAT) cannot be a default purpose: it is asked per request")
    base = config.gateway_url.rstrip("/")
    address = load_account("0x" + config.private_key.hex()).address
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        domain = separator if separator is not None else _gateway_domain(base, config.timeout)
        client = httpx.AsyncClient(
            base_url=base, auth=MedLedgerAuth(config.private_key, domain), timeout=config.timeout
        )
        state["client"] = client
        try:
            yield
        finally:
            await client.aclose()

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "gateway": base, "member_key": address})

    async def proxy(request: Request) -> Response:
        client: httpx.AsyncClient = state["client"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body:
            return _error(413, "payload_too_large", f"the request body exceeds {config.max_body} bytes")
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > config.max_body:
                return _error(413, "payload_too_large", f"the request body exceeds {config.max_body} bytes")
            chunks.append(chunk)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_REQUEST}
        if request.method in ("GET", "HEAD") and config.purpose and PURPOSE_HEADER not in request.headers:
            headers[PURPOSE_HEADER] = config.purpose
        content = b"".join(chunks)
        ctype = headers.get("content-type")
        if ctype:
            headers["content-type"], content = normalize_multipart_boundary(ctype, content)
        query = request.scope.get("query_string", b"")
        url = httpx.URL(request.url.path, query=query) if query else httpx.URL(request.url.path)
        upstream = client.build_request(request.method, url, content=content, headers=headers)
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as err:
            log.warning("the gateway could not be reached: %s", type(err).__name__)
            return _error(502, "gateway_unreachable", "the MedLedger gateway could not be reached")
        out_headers = {k: v for k, v in answer.headers.items() if k.lower() in _FORWARD_RESPONSE}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        return StreamingResponse(body(), status_code=answer.status_code, headers=out_headers)

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/dicomweb", proxy, methods=methods),
        Route("/dicomweb/{rest:path}", proxy, methods=methods),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


_BOUNDARY_PARAM = re.compile(
    r';[ \t]*boundary[ \t]*=[ \t]*(?:"([^"\\]{1,200})"|([^;" \t]{1,200}))', re.IGNORECASE
)


def normalize_multipart_boundary(content_type: str, body: bytes) -> tuple[str, bytes]:
    """Re-frame a multipart body whose boundary is longer than RFC 2046's 70 characters.

    Orthanc's DICOMweb plugin (1.7, Debian 12) sends STOW-RS bodies with a 73-character
    boundary, which a strict parser (the gateway's) refuses. The body is whole here, so the
    edge swaps the boundary for a fresh legal one. Every ``--boundary`` in a valid body is a
    delimiter (RFC 2046 forbids it inside parts), so the swap changes nothing else; the
    new boundary is checked to occur nowhere in the body. Other bodies pass unchanged.
    """
    if not content_type.lower().lstrip().startswith("multipart/"):
        return content_type, body
    m = _BOUNDARY_PARAM.search(content_type)
    if m is None:
        return content_type, body
    old = m.group(1) if m.group(1) is not None else m.group(2)
    if len(old) <= 70:
        return content_type, body
    while True:
        fresh = new_boundary()
        if fresh.encode() not in body:
            break
    reframed = body.replace(b"--" + old.encode("latin-1"), b"--" + fresh.encode())
    return content_type[: m.start()] + f"; boundary={fresh}" + content_type[m.end() :], reframed


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"--listen expects HOST:PORT, not {value!r}")
    return host, int(port)


def run_edge(
    gateway_url: str,
    key_file: str,
    *,
    listen: str = "127.0.0.1:8042",
    purpose: str | None = None,
    dimse_config: str | None = None,
    dimse_port: int | None = None,
    dimse_host: str | None = None,
    allow_remote: bool = False,
    say: Any = print,
) -> None:
    """`medledger edge`: the DICOMweb proxy, and the C-STORE SCP when a DIMSE config is given."""
    from pathlib import Path

    from ledger.keyfiles import read_key
    from ledger.service import free_port

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # their INFO lines carry request paths, i.e. DICOM UIDs
        logging.getLogger(noisy).setLevel(logging.WARNING)
    key = bytes(read_key(Path(key_file)).key)
    host, port = parse_listen(listen)
    if not is_loopback(host) and not allow_remote:
        raise InvalidInput(
            "the edge signs as the hospital for anyone who reaches it: listen on loopback, "
            "or pass --allow-remote behind the hospital's own access control"
        )
    config = EdgeConfig(gateway_url=gateway_url, private_key=key, purpose=purpose)
    app = create_edge_app(config)  # validates the purpose before anything listens
    scp = None
    if dimse_config is None and dimse_port is not None:
        raise InvalidInput("--dimse-port needs --dimse-config (which calling AE titles map to which key)")
    if dimse_config is not None:
        from ledger.dimse import StoreSCP, load_config

        scp = StoreSCP(load_config(Path(dimse_config)), gateway_url, key)
        d_host, d_port = scp.start(dimse_host, dimse_port)
        say(f"medledger DIMSE C-STORE SCP {scp.config.ae_title} listening on {d_host}:{d_port}")
    try:
        import uvicorn

        chosen = port or free_port(host)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=chosen, log_level="warning", access_log=False, lifespan="on")
        )
        address = load_account("0x" + key.hex()).address
        say(f"medledger edge listening on http://{host}:{chosen} (signing as {address} for {gateway_url})")
        server.run()
    finally:
        if scp is not None:
            scp.stop()
