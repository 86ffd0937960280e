"""Domain errors. The HTTP layer maps each class to one status code; nothing below it knows HTTP."""


class LoraserveError(Exception):
    """Base class of every error the server raises on purpose."""


class AdapterValidationError(LoraserveError):
    """An adapter that cannot be served on this base: every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid adapter: " + "; ".join(self.problems))


class InvalidRequestError(LoraserveError):
    """A request that can never be served as asked (an empty prompt, a token id outside the vocabulary):
    the client's mistake. `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapterError(LoraserveError):
    """A request named an adapter the engine does not know."""


class CapacityError(LoraserveError):
    """The engine cannot take the request now (queue full); the caller may retry later."""


class RequestTooLargeError(LoraserveError):
    """A request that can never fit (prompt plus max_tokens beyond the context or the KV cache)."""


class InferenceFailedError(LoraserveError):
    """The engine failed this one request (its forward pass raised, or its logits were not finite);
    the other requests of the batch were served."""


class DatabaseUnavailableError(LoraserveError):
    """The catalogue database cannot be reached (a replica cut off from PostgreSQL): a change is refused,
    not lost, and so is a read with nothing remembered; retry once it is back (503)."""
