"""Experiments, and each request an experiment served (variant, outcome, feedback): their tables in the
one database (server/db), so they live beside the catalogue and survive restarts.

One row per request, filled in as it goes: assigned (before inference), finished (outcome), scored
(feedback). Feedback is an UPDATE that only matches an unscored row, so a duplicate can never win a race.
An experiment's name is claimed in the namespace by the transaction that adds it and freed by the one
that deletes it.
"""

from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import JSON, ForeignKey, String, Text, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.experiments.errors import (
    DuplicateFeedbackError,
    DuplicateRequestIdError,
    ExperimentNameConflictError,
    ExperimentNotFoundError,
    RequestNotFoundError,
)
from server.db import Base, Database, UtcDateTime, utc_now
from server.experiments.model import Assignment, Experiment, Outcome, Promotion, RequestRecord, Status, Variant
from server.read_cache import ReadCache
from server.registry.errors import NameConflictError
from server.registry.namespace import Namespace


class _ExperimentRow(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    variants: Mapped[list[dict]] = mapped_column(JSON)  # replaced whole on change, never mutated in place
    assignment_key: Mapped[str] = mapped_column(String(16))
    min_samples: Mapped[int]
    promotion: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class _RequestRow(Base):
    __tablename__ = "experiment_requests"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    variant: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str | None] = mapped_column(String(128))
    assignment_key: Mapped[str | None] = mapped_column(String(256))  # None: drawn at random
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    error: Mapped[str | None] = mapped_column(String(64))
    output_tokens: Mapped[int] = mapped_column(default=0)
    ttft_s: Mapped[float | None]
    latency_s: Mapped[float | None]
    score: Mapped[float | None]
    scored_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ExperimentStore:
    """Thread-safe; every method is one transaction and returns frozen records."""

    def __init__(self, db: Database, names: Namespace):
        self._db = db
        self._names = names
        self._experiments: ReadCache[str, Experiment | None] = db.read_cache(["experiments"])

    # ---- experiments ----------------------------------------------------------------------------

    def add(self, experiment: Experiment, tenant: str | None = None) -> Experiment:
        """Add an experiment, its name claimed for `tenant` (None: an admin). ExperimentNameConflictError
        if the name is not available to it (an experiment, adapter or alias has it, or another tenant)."""

        def work(session: Session) -> None:
            self._names.claim(session, experiment.name, "experiment", tenant)
            session.add(_ExperimentRow(**_columns(experiment)))

        try:
            self._db.write(work)
        except NameConflictError as exc:
            raise ExperimentNameConflictError(str(exc)) from None
        return experiment

    def get(self, name: str) -> Experiment | None:
        return self._experiments.get(name, lambda: self._get(name))

    def _get(self, name: str) -> Experiment | None:
        with self._db.read() as session:
            row = session.scalar(select(_ExperimentRow).where(_ExperimentRow.name == name))
            return _experiment(row) if row is not None else None

    def all(self) -> list[Experiment]:
        with self._db.read() as session:
            return [_experiment(r) for r in session.scalars(select(_ExperimentRow).order_by(_ExperimentRow.name))]

    def save(self, experiment: Experiment) -> Experiment:
        """Write back a changed experiment (found by name)."""

        def work(session: Session) -> None:
            result = session.execute(
                update(_ExperimentRow).where(_ExperimentRow.name == experiment.name).values(**_columns(experiment))
            )
            if result.rowcount == 0:
                raise ExperimentNotFoundError(f"experiment {experiment.name!r} not found")

        self._db.write(work)
        return experiment

    def delete(self, name: str) -> None:
        """Remove an experiment with its request records; its name becomes free again."""

        def work(session: Session) -> None:
            experiment_id = session.scalar(select(_ExperimentRow.id).where(_ExperimentRow.name == name))
            if experiment_id is None:
                raise ExperimentNotFoundError(f"experiment {name!r} not found")
            session.execute(delete(_RequestRow).where(_RequestRow.experiment_id == experiment_id))
            session.execute(delete(_ExperimentRow).where(_ExperimentRow.id == experiment_id))
            self._names.free(session, name, "experiment")

        self._db.write(work)

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, assignment: Assignment, key: str | None) -> None:
        """Record which variant served a request. DuplicateRequestIdError if the id is already recorded."""

        def work(session: Session) -> None:
            query = select(_ExperimentRow.id).where(_ExperimentRow.name == assignment.experiment)
            experiment_id = session.scalar(query)
            if experiment_id is None:  # deleted since the request was routed
                raise ExperimentNotFoundError(f"experiment {assignment.experiment!r} not found")
            if session.get(_RequestRow, assignment.request_id) is not None:
                raise DuplicateRequestIdError(f"request id {assignment.request_id!r} was already used in an "
                                              "experiment; send a unique X-Request-ID")
            session.add(_RequestRow(
                request_id=assignment.request_id, experiment_id=experiment_id,
                variant=assignment.variant, adapter=assignment.adapter, assignment_key=key, created_at=utc_now(),
            ))

        self._db.write(work)

    def finish_request(self, request_id: str, outcome: Outcome) -> None:
        self._db.write(lambda session: session.execute(
            update(_RequestRow).where(_RequestRow.request_id == request_id)
            .values(finished_at=utc_now(), **asdict(outcome))))

    def score(self, request_ids: list[str], score: float,
              allowed: Callable[[str], bool] | None = None) -> Assignment:
        """Attach feedback to the first of `request_ids` (candidate spellings of one id) that was recorded;
        return its assignment. RequestNotFoundError if none was (or its experiment's name is not
        `allowed`); DuplicateFeedbackError if it has a score."""

        def work(session: Session) -> Assignment:
            row = next(filter(None, (session.get(_RequestRow, i) for i in request_ids)), None)
            experiment = None if row is None else session.scalar(
                select(_ExperimentRow.name).where(_ExperimentRow.id == row.experiment_id))
            if row is None or (allowed is not None and not allowed(experiment)):
                raise RequestNotFoundError(f"no experiment served a request with id {request_ids[0]!r}")
            scored = session.execute(
                update(_RequestRow).where(_RequestRow.request_id == row.request_id, _RequestRow.score.is_(None))
                .values(score=score, scored_at=utc_now())
            )
            if scored.rowcount == 0:
                raise DuplicateFeedbackError(f"request {row.request_id!r} already has feedback")
            return Assignment(experiment, row.variant, row.adapter, row.request_id)

        return self._db.write(work)

    def records(self, name: str) -> list[RequestRecord]:
        """Every request the experiment recorded, oldest first."""
        query = (
            select(_RequestRow).join(_ExperimentRow, _RequestRow.experiment_id == _ExperimentRow.id)
            .where(_ExperimentRow.name == name).order_by(_RequestRow.created_at)
        )
        with self._db.read() as session:
            return [
                RequestRecord(r.variant, r.finished_at is not None, r.error, r.output_tokens, r.ttft_s, r.latency_s,
                              r.score)
                for r in session.scalars(query)
            ]


def _columns(experiment: Experiment) -> dict:
    promotion = experiment.promotion
    return {
        "name": experiment.name, "description": experiment.description, "status": experiment.status.value,
        "variants": [asdict(v) for v in experiment.variants], "assignment_key": experiment.assignment_key,
        "min_samples": experiment.min_samples,
        "promotion": {**asdict(promotion), "at": promotion.at.isoformat()} if promotion else None,
        "created_at": experiment.created_at, "updated_at": experiment.updated_at,
        "started_at": experiment.started_at, "stopped_at": experiment.stopped_at,
    }


def _experiment(row: _ExperimentRow) -> Experiment:
    promotion = row.promotion
    return Experiment(
        name=row.name, description=row.description, status=Status(row.status),
        variants=tuple(Variant(**v) for v in row.variants), assignment_key=row.assignment_key,
        min_samples=row.min_samples, created_at=row.created_at, updated_at=row.updated_at,
        started_at=row.started_at, stopped_at=row.stopped_at,
        promotion=Promotion(**{**promotion, "at": datetime.fromisoformat(promotion["at"])}) if promotion else None,
    )

