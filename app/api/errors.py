"""One place that turns every exception, ours and Litestar's, into the error envelope of SPEC §1."""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from app.api.schemas import ErrorBody, ErrorDetail, ErrorEnvelope, Meta
from app.domain.errors import (
    AppError,
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    NotFound,
    PayloadTooLarge,
    ProviderFailed,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from app.domain.ids import new_request_id
from app.domain.types import readable
from app.observability import loggable_path

log = logging.getLogger("parley.api")
_encoder = msgspec.json.Encoder()

STATUS = {
    ValidationFailed: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    IdempotencyKeyReused: 422,
    RateLimited: 429,
    ProviderFailed: 502,
}
HTTP_CODES = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def request_id_of(scope: dict) -> str:
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = new_request_id()
    return state["request_id"]


def error_bytes(status: int, code: str, message: str, request_id: str, **extra: object) -> bytes:
    body = ErrorBody(code=code, message=message, **extra)  # type: ignore[arg-type]
    return _encoder.encode(ErrorEnvelope(error=body, meta=Meta(request_id=request_id)))


def _response(status: int, body: ErrorBody, request: Request, headers: dict[str, str] | None = None) -> Response:
    envelope = ErrorEnvelope(error=body, meta=Meta(request_id=request_id_of(request.scope)))
    return Response(
        content=_encoder.encode(envelope), status_code=status, media_type="application/json", headers=headers
    )


def app_error_handler(request: Request, exc: AppError) -> Response:
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    body = ErrorBody(code=exc.code, message=exc.message)
    headers = None
    if isinstance(exc, ValidationFailed):
        body.details = [ErrorDetail(field=p.field, message=p.message) for p in exc.details] or [
            ErrorDetail(field="body", message=exc.message)
        ]
    elif isinstance(exc, ProviderFailed):
        body.providerCode = exc.provider_code
        body.conversationId = exc.conversation_id
    elif isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    return _response(status, body, request, headers)


def _public_name(request: Request, key: str) -> str:
    """The name the client sent a parameter under: Litestar reports it by its Python name (`agent_id`), the
    client knows the query, header or cookie name it was declared with (`agentId`, `Idempotency-Key`)."""
    handler = request.scope.get("route_handler")
    parameter = handler.parsed_fn_signature.parameters.get(key) if handler is not None else None
    declared = getattr(parameter, "kwarg_definition", None)
    for alias in (
        getattr(declared, "query", None),
        getattr(declared, "header", None),
        getattr(declared, "cookie", None),
    ):
        if isinstance(alias, str) and alias:
            return alias
    return key


_MISSING = re.compile(r"Missing required \w+ parameter '([^']+)'")


def http_error_handler(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, NotFoundException):
        return _response(404, ErrorBody(code="not_found", message="No such route or resource."), request)
    if isinstance(exc, MethodNotAllowedException):
        return _response(
            405,
            ErrorBody(code="method_not_allowed", message="This method is not allowed on this route."),
            request,
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, ValidationException):
        details = []
        for item in exc.extra if isinstance(exc.extra, list) else []:
            if isinstance(item, dict):
                field = _public_name(request, str(item.get("key", "query")))
                details.append(ErrorDetail(field=field, message=readable(str(item.get("message", "")))))
        if not details and (missing := _MISSING.match(str(exc.detail))):
            # Litestar names a missing parameter only in its message (by the name the client sends it under).
            details.append(ErrorDetail(field=missing.group(1), message="is required"))
        message = "; ".join(f"{d.field}: {d.message}" for d in details) or "The request is not valid."
        return _response(400, ErrorBody(code="validation_error", message=message, details=details or None), request)
    if status == 413:
        return _response(413, ErrorBody(code="payload_too_large", message="The request body is too large."), request)
    if status >= 500:
        return internal_error_handler(request, exc)
    code = HTTP_CODES.get(status, "error")
    return _response(status, ErrorBody(code=code, message=str(exc.detail)), request, dict(exc.headers or {}))


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.error(
        "unhandled error on %s %s: %s",
        request.method,
        loggable_path(request.scope.get("path", "")),
        type(exc).__name__,
        exc_info=exc,
    )
    return _response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        ErrorBody(code="internal_error", message="Something went wrong on our side; it has been logged."),
        request,
    )


EXCEPTION_HANDLERS = {
    AppError: app_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}
