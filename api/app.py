"""The FastAPI mediation service: `create_app(workdir)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dicomweb, errors, routes
from devnet.manager import load
from ledger.gateway import Gateway, GatewayConfig


class RequestIdHeader:
    """Adds `X-Request-Id` (the audit event's request id) to every response of a signed request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx = (scope.get("state") or {}).get("ctx")
                headers = list(message.get("headers", []))
                if ctx is not None and not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", ctx.request_id.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(workdir: Path, config: GatewayConfig | None = None) -> FastAPI:
    devnet = load(workdir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(workdir, devnet, config)
        gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="MedLedger Gateway",
        version="0.1.0",
        description="Consent-mediated DICOM exchange with an on-chain audit trail. "
        "Every endpoint except /health, /info and the OpenAPI document requires an EIP-712 request signature.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestIdHeader)

    @app.get("/health", tags=["service"])
    async def health(request: Request) -> JSONResponse:
        """200 "ok" when decisions use fresh chain state and the log anchors; else 503 "degraded"."""
        gw: Gateway = request.app.state.gateway
        staleness = gw.index.staleness()
        degraded = staleness > gw.config.max_staleness or gw.anchorer.diverged
        body = {
            "status": "degraded" if degraded else "ok",
            "index_staleness_seconds": round(staleness, 3),
            "max_staleness_seconds": gw.config.max_staleness,
            "log_size": gw.audit.size(),
            "anchored": gw.anchorer.anchored_size,
            "anchor_error": gw.anchorer.last_error,
        }
        return JSONResponse(body, status_code=503 if degraded else 200)

    @app.get("/info", tags=["service"])
    async def info(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        return gw.info()

    app.include_router(dicomweb.router)
    app.include_router(routes.router)
    return app
