"""The FastAPI mediation service: `create_app(workdir)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from api import dicomweb, errors, routes
from devnet.manager import load
from ledger.gateway import Gateway, GatewayConfig


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

    @app.get("/health", tags=["service"])
    async def health(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        return {
            "status": "ok",
            "index_staleness_seconds": round(gw.index.staleness(), 3),
            "log_size": gw.audit.size(),
            "anchored": gw.anchorer.anchored_size,
            "anchor_error": gw.anchorer.last_error,
        }

    @app.get("/info", tags=["service"])
    async def info(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        return gw.info()

    app.include_router(dicomweb.router)
    app.include_router(routes.router)
    return app
