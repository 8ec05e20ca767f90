"""How the HTTP API answers a refusal or a failure: ``{"error": <ErrorCode>, "message": …}``
with the code's own HTTP status (``ErrorCode.http_status``).

    RequestError, StoreRefusal ─▶ on_refusal (the one translation of a refused request)
    RequestValidationError ─────▶ 400 bad_request, naming the first bad field (never 422)
    Starlette's HTTPException ──▶ its status (405 with every method of the resource in Allow)
    StorageError ───────────────▶ 503 unavailable (logged; the client retries)
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.refusals import refusal_error
from mqchat.errors import ErrorCode, RequestError, StorageError
from storage.base import StoreRefusal

logger = logging.getLogger(__name__)

# Starlette's own answers (unknown path, wrong method) with the protocol's codes.
_STARLETTE_CODES = {404: ErrorCode.NOT_FOUND, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN}


def error_response(code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": str(code), "message": message}, status_code=code.http_status)


async def on_refusal(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, StoreRefusal):
        exc = refusal_error(exc)
    assert isinstance(exc, RequestError)  # registered for these two only
    return error_response(exc.code, exc.message)


async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(ErrorCode.BAD_REQUEST, f"{where}: {first.get('msg', 'invalid request')}")


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STARLETTE_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # RFC 9110: Allow lists every method of the resource (Starlette names only the first
        # route's, and PUT and DELETE of one path are two routes here).
        path = request.scope["path"]
        routes = [r for r in request.app.routes if isinstance(r, APIRoute) and r.path_regex.match(path)]
        methods = {m for r in routes for m in (r.methods or ())}
        headers["Allow"] = ", ".join(sorted(methods))
    return JSONResponse({"error": str(code), "message": str(exc.detail)}, status_code=exc.status_code, headers=headers)


async def on_storage_error(_: Request, exc: Exception) -> JSONResponse:
    logger.error("storage failed during an HTTP request: %s", exc)
    return error_response(ErrorCode.UNAVAILABLE, "storage unavailable; retry")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, on_refusal)
    app.add_exception_handler(StoreRefusal, on_refusal)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(StorageError, on_storage_error)
