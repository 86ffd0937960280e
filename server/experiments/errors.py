"""Errors of experiments. Each is a LoraserveError, so server/api/errors.py maps it to one status."""

from server.errors import LoraserveError


class ExperimentError(LoraserveError):
    """Base class of the experiment errors."""


class ExperimentNotFoundError(ExperimentError):
    """No experiment has that name."""


class InvalidExperimentError(ExperimentError):
    """A definition or a change that cannot be accepted (variants, weights, assignment key, ...)."""


class ExperimentNameConflictError(ExperimentError):
    """The name is taken in the shared namespace of `model` strings (experiment, adapter, alias, base)."""


class InvalidTransitionError(ExperimentError):
    """A status change the lifecycle does not allow (e.g. a stopped experiment cannot run again)."""


class ExperimentNotRunningError(ExperimentError):
    """A request named an experiment that is a draft, paused or stopped: it serves no traffic."""


class RequestNotFoundError(ExperimentError):
    """Feedback names a request id that no experiment served."""


class DuplicateFeedbackError(ExperimentError):
    """Feedback was already given for this request."""


class DuplicateRequestIdError(ExperimentError):
    """The caller reused an X-Request-ID that an experiment has already recorded."""


class NoWinnerError(ExperimentError):
    """Promotion without a named variant, while the results name no winner."""


class NotPromotableError(ExperimentError):
    """The variant to promote is the bare base: an alias points only at an adapter version."""
