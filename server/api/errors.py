"""The one place that maps domain errors to HTTP statuses, in OpenAI's error shape:
{"error": {"message", "type", "param", "code"}}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import errors
from server.experiments import errors as experiment_errors
from server.registry import errors as registry_errors
from server.tenancy import errors as tenancy_errors

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error raised by a route itself (bad parameter combination, unsupported feature, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          431: "invalid_request_error", 500: "server_error",
          503: "service_unavailable_error"}

# Domain error -> (status, code). Subclasses match their closest listed ancestor.
_DOMAIN: list[tuple[type[Exception], int, str]] = [
    (tenancy_errors.AuthenticationError, 401, "invalid_api_key"),
    (tenancy_errors.PermissionDeniedError, 403, "permission_denied"),
    (tenancy_errors.TenantNotFoundError, 404, "tenant_not_found"),
    (tenancy_errors.TenantConflictError, 409, "tenant_conflict"),
    (tenancy_errors.KeyNotFoundError, 404, "key_not_found"),
    (tenancy_errors.RateLimitedError, 429, "rate_limit_exceeded"),
    (tenancy_errors.QuotaExceededError, 403, "quota_exceeded"),
    (errors.UnknownAdapterError, 404, "model_not_found"),
    (registry_errors.AdapterNotFoundError, 404, "model_not_found"),
    (errors.AdapterValidationError, 422, "invalid_adapter"),
    (registry_errors.UploadTooLargeError, 413, "upload_too_large"),
    (registry_errors.InvalidNameError, 400, "invalid_name"),
    (registry_errors.NameConflictError, 409, "name_conflict"),
    (registry_errors.PathNotAllowedError, 403, "path_not_allowed"),
    (errors.RequestTooLargeError, 400, "context_length_exceeded"),
    (errors.InvalidRequestError, 400, "invalid_request"),
    (errors.CapacityError, 503, "server_busy"),
    (errors.DatabaseUnavailableError, 503, "catalogue_unavailable"),
    (errors.InferenceFailedError, 500, "inference_failed"),
    (experiment_errors.ExperimentNotFoundError, 404, "experiment_not_found"),
    (experiment_errors.InvalidExperimentError, 400, "invalid_experiment"),
    (experiment_errors.ExperimentNameConflictError, 409, "name_conflict"),
    (experiment_errors.InvalidTransitionError, 409, "invalid_transition"),
    (experiment_errors.ExperimentNotRunningError, 409, "experiment_not_running"),
    (experiment_errors.RequestNotFoundError, 404, "request_not_found"),
    (experiment_errors.DuplicateFeedbackError, 409, "duplicate_feedback"),
    (experiment_errors.DuplicateRequestIdError, 409, "duplicate_request_id"),
    (experiment_errors.NoWinnerError, 409, "no_winner"),
    (experiment_errors.NotPromotableError, 409, "not_promotable"),
]
RETRY_AFTER_SECONDS = "1"
_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": RETRY_AFTER_SECONDS}}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def domain_error_status(exc: Exception) -> tuple[int, str] | None:
    for cls, status, code in _DOMAIN:
        if isinstance(exc, cls):
            return status, code
    return None


INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def _counted(request: Request, response: JSONResponse) -> JSONResponse:
    """Count a refused or failed inference request under the adapter it resolved to (if it got that far:
    unresolved names are not used as labels, so callers cannot grow the label set at will)."""
    state = getattr(request.app.state, "loraserve", None)
    if state is not None and request.url.path in INFERENCE_PATHS:
        label = getattr(request.state, "metrics_label", "unresolved")
        state.metrics.errors.labels(label, str(response.status_code)).inc()
    return response


# pydantic's words for some checks, as a client of this API should read them.
_EXPLAINED = {"extra_forbidden": "unknown or unsupported parameter (loraserve refuses what it would ignore)"}


def _field_path(loc: tuple) -> str:
    """`messages.0.content` from pydantic's location, without where it came from (body, query) or the
    union member it was tried as (`function-after[...]`, `list[int]`)."""
    return ".".join(str(p) for p in loc
                    if isinstance(p, int) or (p not in ("body", "query", "path", "header") and p.isidentifier()))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _counted(request, error_response(exc.status, exc.message, exc.param, exc.code, exc.headers))

    @app.exception_handler(errors.LoraserveError)
    async def _domain_error(request: Request, exc: errors.LoraserveError):
        status, code = domain_error_status(exc) or (500, "internal_error")
        headers = _HEADERS.get(status)
        if isinstance(exc, tenancy_errors.RateLimitedError):
            headers = {"Retry-After": str(exc.retry_after)}
        return _counted(request, error_response(status, str(exc), getattr(exc, "param", None), code, headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # A field's own check ("Value error, ...") says more than the members of a union it failed.
        errors = [e for e in exc.errors() if e["type"] == "value_error"] or exc.errors()
        if errors and errors[0]["type"] == "json_invalid":  # its location is a character offset, not a field
            return _counted(request, error_response(400, f"the body is not valid JSON: {errors[0]['msg']}",
                                                    code="invalid_json"))
        first = _field_path(errors[0]["loc"]) if errors else ""
        message = "; ".join(f"{_field_path(e['loc'])}: {_EXPLAINED.get(e['type'], e['msg'])}" for e in errors)
        return _counted(request, error_response(400, message, first or None, "invalid_parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _counted(request, error_response(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not the client's mistake: the traceback goes to the log under the request id, which the
        # answer names so an operator can find it.
        request_id = getattr(request.state, "request_id", None)
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return _counted(request, error_response(
            500, f"internal server error (request id {request_id}); the server log has the details",
            code="internal_error"))
