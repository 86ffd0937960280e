"""Errors of the adapter registry. Each is a LoraserveError, so the HTTP layer maps it to one status."""

from server.errors import LoraserveError, UnknownAdapterError


class AdapterNotFoundError(UnknownAdapterError):
    """No live adapter (or alias) answers to the name or version asked for."""


class InvalidNameError(LoraserveError):
    """A name, alias or `model` reference that breaks the safe-name rules."""


class NameConflictError(LoraserveError):
    """An alias would shadow an adapter name, or an adapter name is already taken by an alias."""


class UploadTooLargeError(LoraserveError):
    """The adapter's files together exceed the configured maximum size."""


class PathNotAllowedError(LoraserveError):
    """A path given by a client that resolves (after symlinks) outside the adapters directory."""
