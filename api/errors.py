"""Domain errors -> HTTP, in one place. Every refusal is also recorded in the audit log."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.errors import InvalidInput, MedLedgerError, NotFound

log = logging.getLogger("medledger.api")


def _context(request: Request):  # type: ignore[no-untyped-def]
    from ledger.gateway import RequestContext

    ctx = getattr(request.state, "ctx", None)
    if ctx is None:
        ctx = RequestContext()
        request.state.ctx = ctx
    return ctx


def error_response(request: Request, err: MedLedgerError) -> JSONResponse:
    ctx = _context(request)
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.record_refusal(ctx, err)
    headers = {"X-Request-Id": ctx.request_id}
    if err.http_status == 401:
        headers["WWW-Authenticate"] = 'MedLedger-EIP712 realm="medledger"'
    return JSONResponse(
        status_code=err.http_status,
        content={"error": err.code, "message": err.message, "request_id": ctx.request_id},
        headers=headers,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(MedLedgerError)
    async def _domain(request: Request, exc: MedLedgerError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # No route (404) or method (405): refused before any endpoint ran, recorded all the same.
        err: MedLedgerError
        if exc.status_code == 404:
            err = NotFound("no such endpoint", code="unknown_endpoint")
        else:
            err = InvalidInput("this method is not allowed on this endpoint", code="method_not_allowed")
            err.http_status = exc.status_code
        response = error_response(request, err)
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
        return error_response(request, InvalidInput(f"invalid request fields: {fields}"))

    app.add_middleware(CatchAll)


class CatchAll:
    """Turns an unexpected exception into a PHI-free 500, recorded like any refusal.

    A pure ASGI middleware inside Starlette's ServerErrorMiddleware: that one would re-raise
    after answering, so the server would log a traceback (with argument values) and drop the
    keep-alive connection. Once a response has started (a stream failing midway) there is
    nothing left to answer: the exception propagates and the connection is aborted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            request = Request(scope)
            log.error("internal error (request %s): %s", _context(request).request_id, type(exc).__name__)
            response = error_response(
                request, MedLedgerError("internal error; the request was not completed")
            )
            await response(scope, receive, send)
