"""ExperimentService: the one object the app talks to about experiments. Definitions and their lifecycle,
routing a request to a variant, outcomes and feedback, results, and promoting the winner to an alias.

A request's outcome is written before its response is acknowledged (the last byte of a response, or
the error answer of a refused request, goes out after the write committed), so a crash right after a
response cannot lose it, and results read after a response always count it.

Request ids are recorded per tenant: two tenants may send the same X-Request-ID (each may score only its
own); admins' requests are recorded under the bare id.
"""

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Protocol
from uuid import uuid4

from server.db import utc_now
from server.experiments.assignment import MAX_KEY_LENGTH, choose, key_for
from server.experiments.definition import check_variants, reweighted
from server.experiments.errors import (
    ExperimentNotFoundError,
    ExperimentNotRunningError,
    InvalidExperimentError,
    InvalidTransitionError,
    NotPromotableError,
    NoWinnerError,
)
from server.experiments.lifecycle import not_running_message, with_status
from server.experiments.model import (
    Assignment,
    AssignmentKey,
    Caller,
    Experiment,
    Outcome,
    Promotion,
    Status,
    Variant,
)
from server.experiments.results import Results, analyse
from server.experiments.store import ExperimentStore
from server.registry.names import check_name
from server.registry.registry import AdapterRegistry

log = logging.getLogger(__name__)

DEFAULT_MIN_SAMPLES = 30
MAX_MIN_SAMPLES = 1_000_000
MAX_ABS_SCORE = 1e9  # feedback beyond this is refused: sums and variances of scores must stay finite
_REQUEST_ID_COLUMN = 128  # experiment_requests.request_id
# Feedback may name the bare request id or the response id built from it.
RESPONSE_ID_PREFIXES = ("cmpl-", "chatcmpl-")


class ExperimentObserver(Protocol):
    """Told of every outcome and every feedback (the app's metrics)."""

    def outcome(self, assignment: Assignment, outcome: Outcome) -> None: ...

    def feedback(self, assignment: Assignment, score: float) -> None: ...


class ExperimentService:
    def __init__(self, store: ExperimentStore, registry: AdapterRegistry, base_name: str,
                 observer: ExperimentObserver | None = None):
        self._store = store
        self._registry = registry
        self._base_name = base_name
        self._observer = observer

    # ---- definitions ----------------------------------------------------------------------------

    def create(self, name: str, variants: Sequence[Variant], *, status: Status = Status.DRAFT, description: str = "",
               assignment_key: AssignmentKey = "user", min_samples: int = DEFAULT_MIN_SAMPLES,
               tenant: str | None = None) -> Experiment:
        """Define an experiment, each variant's adapter pinned to one version now (a bare name to its newest,
        an alias to its target; the base's name to the bare base). Its name, one of the namespace of `model`
        strings, is claimed for `tenant` (None: an admin): ExperimentNameConflictError if it is not
        available."""
        check_name(name, "experiment name")
        if status not in (Status.DRAFT, Status.RUNNING):
            raise InvalidExperimentError(f"an experiment starts as draft or running, not {status.value}")
        if not 2 <= min_samples <= MAX_MIN_SAMPLES:
            raise InvalidExperimentError(f"min_samples must be in [2, {MAX_MIN_SAMPLES}] "
                                         "(a variance needs two values)")
        check_variants(tuple(variants))
        pinned = tuple(self._pin(v) for v in variants)
        now = utc_now()
        return self._store.add(Experiment(
            name=name, description=description, status=status, variants=pinned, assignment_key=assignment_key,
            min_samples=min_samples, created_at=now, updated_at=now,
            started_at=now if status is Status.RUNNING else None,
        ), tenant)

    def get(self, name: str) -> Experiment:
        experiment = self._store.get(name)
        if experiment is None:
            raise ExperimentNotFoundError(f"experiment {name!r} not found")
        return experiment

    def all(self) -> list[Experiment]:
        return self._store.all()

    def find(self, model: str) -> Experiment | None:
        """The experiment a request's `model` names, if any (`name@version` never names one)."""
        return None if "@" in model else self._store.get(model)

    def update(self, name: str, *, status: Status | None = None, weights: dict[str, float] | None = None,
               promote_alias: str | None = None, promote_variant: str | None = None,
               tenant: str | None = None) -> Experiment:
        """Change the status and/or the weights, and optionally point `promote_alias` (claimed for `tenant`,
        None: an admin) at a variant's adapter (the named one, else the results' winner). Everything is
        checked before anything changes."""
        experiment = self.get(name)
        changed = experiment
        if weights:
            if experiment.status is Status.STOPPED:
                raise InvalidTransitionError(f"experiment {name!r} is stopped: its weights can no longer change")
            changed = replace(changed, variants=reweighted(changed.variants, weights))
        now = utc_now()
        if status is not None:
            changed = with_status(changed, status, now)
        if promote_alias is not None:
            promotion = self._promote(experiment, promote_alias, promote_variant, now, tenant)
            changed = replace(changed, promotion=promotion)
        return self._store.save(replace(changed, updated_at=now))

    def promote(self, name: str, alias: str, variant: str | None = None, tenant: str | None = None) -> Experiment:
        return self.update(name, promote_alias=alias, promote_variant=variant, tenant=tenant)

    def delete(self, name: str) -> None:
        """Remove the experiment and its records (its results are gone; the name is free again)."""
        self._store.delete(name)

    # ---- traffic --------------------------------------------------------------------------------

    def assign(self, experiment: Experiment, caller: Caller) -> Assignment:
        """Pick the caller's variant and record it under the request id (blocking: a database write).
        ExperimentNotRunningError unless the experiment is running."""
        if experiment.status is not Status.RUNNING:
            raise ExperimentNotRunningError(not_running_message(experiment))
        key = key_for(experiment.assignment_key, caller)
        variant = choose(experiment.variants, key or uuid4().hex, salt=experiment.name)
        assignment = Assignment(experiment.name, variant.name, variant.adapter,
                                _recorded_id(caller.tenant, caller.request_id))
        self._store.add_request(assignment, _stored_key(key))
        return assignment

    async def record_outcome(self, assignment: Assignment, outcome: Outcome) -> None:
        """Count the outcome and write it; returns once the write committed. Shielded: a caller that is
        cancelled meanwhile (its client left) does not cancel the write."""
        if self._observer is not None:
            self._observer.outcome(assignment, outcome)
        write = asyncio.to_thread(self._store.finish_request, assignment.request_id, outcome)
        try:
            await asyncio.shield(write)
        except Exception:  # CancelledError is not an Exception: a cancelled caller still propagates it
            log.exception("recording the outcome of request %s failed", assignment.request_id)

    def feedback(self, request_id: str, score: float, tenant: str | None = None,
                 allowed: Callable[[str], bool] | None = None) -> Assignment:
        """Attach a score (binary as 0/1, or a finite number within ±MAX_ABS_SCORE) to the request's
        variant, once. `request_id` is the bare id or the response id (`cmpl-<id>`, `chatcmpl-<id>`) of a
        request of `tenant`; a request of an experiment whose name is not `allowed` answers as an
        unknown one."""
        if not (math.isfinite(score) and abs(score) <= MAX_ABS_SCORE):
            raise InvalidExperimentError(f"score must be a finite number within ±{MAX_ABS_SCORE:g}")
        bare = [request_id.removeprefix(p) for p in RESPONSE_ID_PREFIXES if request_id.startswith(p)]
        spellings = {_recorded_id(tenant, i): i for i in (request_id, *bare)}  # recorded key -> the caller's id
        assignment = self._store.score(list(spellings), float(score), allowed)
        assignment = replace(assignment, request_id=spellings[assignment.request_id])
        if self._observer is not None:
            self._observer.feedback(assignment, float(score))
        return assignment

    def results(self, name: str) -> Results:
        experiment = self.get(name)
        return analyse(experiment, self._store.records(name))

    # ---- internals ------------------------------------------------------------------------------

    def _pin(self, variant: Variant) -> Variant:
        if variant.adapter is None or variant.adapter == self._base_name:
            return replace(variant, adapter=None)
        return replace(variant, adapter=self._registry.resolve(variant.adapter).key)

    def _promote(self, experiment: Experiment, alias: str, variant_name: str | None, now: datetime,
                 tenant: str | None) -> Promotion:
        if variant_name is None:
            variant = self._winner(experiment)
        else:
            variant = experiment.variant(variant_name)
            if variant is None:
                raise InvalidExperimentError(f"experiment {experiment.name!r} has no variant {variant_name!r}")
        if variant.adapter is None:
            raise NotPromotableError(f"variant {variant.name!r} is the bare base; an alias points at an adapter version")
        self._registry.set_alias(alias, variant.adapter, tenant)  # claims the alias's name
        return Promotion(alias, variant.name, variant.adapter, now)

    def _winner(self, experiment: Experiment) -> Variant:
        verdict = self.results(experiment.name).verdict
        if verdict.winner is None:
            raise NoWinnerError(f"no winner to promote: {verdict.message}; name a variant to promote it anyway")
        return experiment.variant(verdict.winner)


def _stored_key(key: str | None) -> str | None:
    # Assignment hashes the whole key; only the stored copy is bounded.
    if key is None or len(key) <= MAX_KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _recorded_id(tenant: str | None, request_id: str) -> str:
    """The key a request is recorded under: the bare id for admins, `tenant/id` for a tenant (tenant
    names hold no '/'), hashed when that would not fit the column."""
    if tenant is None:
        return request_id
    scoped = f"{tenant}/{request_id}"
    if len(scoped) <= _REQUEST_ID_COLUMN:
        return scoped
    return f"{tenant}/sha256:{hashlib.sha256(request_id.encode()).hexdigest()}"[:_REQUEST_ID_COLUMN]

