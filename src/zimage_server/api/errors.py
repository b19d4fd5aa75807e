"""Every failure leaves the server as the contract's envelope: {"error": {"code", "message"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zimage_server.errors import ApiError
from zimage_server.schemas import ErrorEnvelope

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in (
        (400, "Malformed request"),
        (401, "Missing or invalid API key"),
        (402, "Not enough credits"),
        (403, "Forbidden"),
        (404, "No such resource"),
        (409, "Conflict (a reused Idempotency-Key, a finished task)"),
        (410, "Gone (an expired image URL)"),
        (413, "Request body too large"),
        (422, "Invalid parameters"),
        (429, "Rate limited or too many queued tasks (see Retry-After)"),
        (503, "Model not ready or queue full (see Retry-After)"),
    )
}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _envelope(
    status: int, code: str, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if param is not None:
        error["param"] = param
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return 400, "invalid_json", "the request body is not valid JSON", None
    if kind == "extra_forbidden":
        return 422, "unknown_parameter", f"unknown field {field!r}: this endpoint does not accept it", field
    if kind == "missing":
        return 422, "missing_parameter", f"{field} is required", field
    if kind in ("model_attributes_type", "dict_type") and not location:
        return 422, "validation_error", "the request body must be a JSON object", None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return 422, "validation_error", f"{field}: {message}{more}" if field else f"{message}{more}", field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message, param = _describe_validation(exc)
        return _envelope(status, code, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _envelope(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error_response()


def internal_error_response() -> JSONResponse:
    return _envelope(500, "internal_error", "the server hit an unexpected error; it has been logged")
