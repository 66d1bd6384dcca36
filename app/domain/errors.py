"""Domain errors, raised by services and turned into HTTP answers in one place (app/api/errors.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldProblem:
    field: str
    message: str


class AppError(Exception):
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(AppError):
    code = "validation_error"

    def __init__(self, message: str, details: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.details = details or []

    @classmethod
    def field(cls, name: str, message: str) -> ValidationFailed:
        return cls.of([FieldProblem(name, message)])

    @classmethod
    def of(cls, problems: list[FieldProblem]) -> ValidationFailed:
        """Every problem at once: `field: message` pairs joined by `; `, and each one in the details."""
        return cls("; ".join(f"{p.field}: {p.message}" for p in problems), problems)


class Unauthorized(AppError):
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Missing or invalid API key.")


class Forbidden(AppError):
    code = "forbidden"


class NotFound(AppError):
    code = "not_found"


class Conflict(AppError):
    """A request that cannot proceed in the current state; `code` names which conflict."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class IdempotencyKeyReused(AppError):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different request body.")


class PayloadTooLarge(AppError):
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    code = "unsupported_media_type"


@dataclass
class RateLimited(AppError):
    retry_after: int = 1
    message: str = field(default="Rate limit exceeded; retry later.")
    code = "rate_limited"

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)


class ProviderFailed(AppError):
    """The SMS provider rejected or failed a send."""

    code = "provider_error"

    def __init__(self, message: str, provider_code: str, conversation_id: str | None = None) -> None:
        super().__init__(message)
        self.provider_code = provider_code
        self.conversation_id = conversation_id
