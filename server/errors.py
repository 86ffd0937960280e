"""Domain errors. The HTTP layer maps each class to one status code; nothing below it knows HTTP."""


class LoraserveError(Exception):
    """Base class of every error the server raises on purpose."""


class AdapterValidationError(LoraserveError):
    """An adapter that cannot be served on this base: every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid adapter: " + "; ".join(self.problems))


class InvalidRequestError(LoraserveError):
    """A request the engine can never serve as asked (an empty prompt, ...): the client's mistake."""


class UnknownAdapterError(LoraserveError):
    """A request named an adapter the engine does not know."""


class CapacityError(LoraserveError):
    """The engine cannot take the request now (queue full); the caller may retry later."""


class RequestTooLargeError(LoraserveError):
    """A request that can never fit (prompt plus max_tokens beyond the context or the KV cache)."""
