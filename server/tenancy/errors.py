"""Errors of tenancy. Each is a LoraserveError, so the HTTP layer maps it to one status."""

from server.errors import LoraserveError


class AuthenticationError(LoraserveError):
    """No API key, or one that is unknown or revoked."""


class PermissionDeniedError(LoraserveError):
    """A known caller asked for something its role does not allow."""


class TenantNotFoundError(LoraserveError):
    """No tenant has that name."""


class TenantConflictError(LoraserveError):
    """A tenant with that name exists already."""


class KeyNotFoundError(LoraserveError):
    """No API key has that id."""


class RateLimitedError(LoraserveError):
    """A tenant went over its requests or tokens per minute, or its requests in flight."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceededError(LoraserveError):
    """A tenant's adapters would go over its count or stored-bytes quota."""
