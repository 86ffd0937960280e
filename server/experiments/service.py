"""ExperimentService: the one object the app talks to about experiments. Definitions and their lifecycle,
routing a request to a variant, outcomes and feedback, results, and promoting the winner to an alias.

Outcomes are written by one background thread, in order, so the response path never waits on the
database after the response has started; `results` first waits for that queue to drain, so a result read
after a response was received always counts it.
"""

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiment-outcomes")

    def close(self) -> None:
        """Write the outcomes still queued, then stop the writer."""
        self._writer.shutdown(wait=True)

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
        if min_samples < 2:
            raise InvalidExperimentError("min_samples must be at least 2 (a variance needs two values)")
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
        assignment = Assignment(experiment.name, variant.name, variant.adapter, caller.request_id)
        self._store.add_request(assignment, _stored_key(key))
        return assignment

    def record_outcome(self, assignment: Assignment, outcome: Outcome) -> None:
        """Count the outcome now and queue its write (never blocks the caller)."""
        if self._observer is not None:
            self._observer.outcome(assignment, outcome)
        try:
            write = self._writer.submit(self._store.finish_request, assignment.request_id, outcome)
        except RuntimeError:  # a stream that outlived the shutdown's grace period
            log.warning("outcome of request %s not recorded: shutting down", assignment.request_id)
            return
        write.add_done_callback(_log_failure)

    def feedback(self, request_id: str, score: float, allowed: Callable[[str], bool] | None = None) -> Assignment:
        """Attach a score (binary as 0/1, or any finite number) to the request's variant, once.
        `request_id` is the bare id or the response id (`cmpl-<id>`, `chatcmpl-<id>`); a request of an
        experiment whose name is not `allowed` answers as an unknown one."""
        if not math.isfinite(score):
            raise ValueError("score must be a finite number")
        bare = [request_id.removeprefix(p) for p in RESPONSE_ID_PREFIXES if request_id.startswith(p)]
        assignment = self._store.score([request_id, *bare], float(score), allowed)
        if self._observer is not None:
            self._observer.feedback(assignment, float(score))
        return assignment

    def results(self, name: str) -> Results:
        self._writer.submit(lambda: None).result()  # outcomes queued before this call are written
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


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.error("recording an experiment outcome failed", exc_info=future.exception())

