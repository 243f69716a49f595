"""One error type with a status and a message; the web handler and the CLI both print it."""

from __future__ import annotations


class NeedleError(Exception):
    """An error a user can act on: `message` says what was wrong, `hint` what to do."""

    def __init__(self, message: str, *, status: int = 400, hint: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.hint = hint
        self.headers = headers  # sent with the web answer (e.g. Retry-After)

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class NotFound(NeedleError):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, status=404, hint=hint)


class TooManyRequests(NeedleError):
    """A client asked for more live requests than the rate limit allows: a 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int, hint: str | None = None):
        super().__init__(message, status=429, hint=hint, headers={"Retry-After": str(retry_after)})
