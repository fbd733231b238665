"""What stands around the app of `lorakit serve`: errors in the OpenAI envelope
{"error": {message, type, param, code}}, and a pure ASGI guard that checks the API key and the
body size before the app sees a request, and counts every request for /metrics.

A 500 tells the client only an id to quote; the server's log has that id with the exception
(whose text may name files, tensors and code the client has no business seeing).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LorakitError
from . import protocol as P
from .metrics import Metrics

log = logging.getLogger("lorakit.serve")

ENDPOINTS = (
    "/v1/models",
    "/classify",
    "/v1/classify",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/metrics",
)


class Problem(LorakitError):
    """An answer other than 200, with the message for the client."""

    user_fixable = False  # answered over HTTP; one reaching the command line is a bug

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def internal_error(err: BaseException, what: str) -> Problem:
    """The 500 for an unexpected `err`: logged with a fresh id, which is all the client gets."""
    rid = P.request_id("error")
    log.error("%s [%s]: %s: %s", what, rid, type(err).__name__, err, exc_info=err)
    return Problem(500, f"internal error; the server's log has the details under {rid}")


def error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(_request, err: Problem) -> JSONResponse:
        return JSONResponse(
            P.error_body(err.status, err.message, err.param), status_code=err.status, headers=err.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        shown = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:10])
        param = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
        message = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}: {shown}"
        return JSONResponse(P.error_body(422, message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            P.error_body(err.status_code, str(err.detail)),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def crash(request, err: Exception) -> JSONResponse:
        problem = internal_error(err, f"{request.method} {request.url.path} failed")
        return JSONResponse(P.error_body(500, problem.message), status_code=500)


class Guard:
    """Pure ASGI middleware around the app: the API key, the body size limit, and the request
    metrics (status and time to the end of the response, streams included)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, metrics: Metrics) -> None:
        if api_key is not None and not api_key.strip():  # "$KEY" of an unset variable: never serve open
            raise ValueError("the API key is empty")
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.request(endpoint, status[0], time.perf_counter() - started)

        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _send_error(sending, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _send_error(sending, 413, f"the request body is over {self.max_body} bytes")
        body, more = b"", True
        while more:  # bodies are small: read it here, counting, then hand it to the app whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(sending, 413, f"the request body is over {self.max_body} bytes")
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, sending)


async def _send_error(send: Any, status: int, message: str) -> None:
    payload = json.dumps(P.error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
