"""Experiments, and each request an experiment served (variant, outcome, feedback), in SQL through
SQLAlchemy 2.0. Its own tables on the catalogue's engine, so they live in the same database (SQLite for
one server, PostgreSQL when replicas share a catalogue) and survive restarts.

One row per request, filled in as it goes: assigned (before inference), finished (outcome), scored
(feedback). Feedback is an UPDATE that only matches an unscored row, so a duplicate can never win a race.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Engine, ForeignKey, String, Text, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.experiments.errors import (
    DuplicateFeedbackError,
    DuplicateRequestIdError,
    ExperimentNameConflictError,
    ExperimentNotFoundError,
    RequestNotFoundError,
)
from server.experiments.model import Assignment, Experiment, Outcome, Promotion, RequestRecord, Status, Variant
from server.read_cache import ReadCache


class _Base(DeclarativeBase):
    pass


class _ExperimentRow(_Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    variants: Mapped[list[dict]] = mapped_column(JSON)  # replaced whole on change, never mutated in place
    assignment_key: Mapped[str] = mapped_column(String(16))
    min_samples: Mapped[int]
    promotion: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _RequestRow(_Base):
    __tablename__ = "experiment_requests"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    variant: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str | None] = mapped_column(String(128))
    assignment_key: Mapped[str | None] = mapped_column(String(256))  # None: drawn at random
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(String(64))
    output_tokens: Mapped[int] = mapped_column(default=0)
    ttft_s: Mapped[float | None]
    latency_s: Mapped[float | None]
    score: Mapped[float | None]
    scored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ExperimentStore:
    """Thread-safe; every method is one transaction and returns frozen records."""

    def __init__(self, engine: Engine):
        _Base.metadata.create_all(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite takes one writer at a time: serialise this store's writes rather than retry them.
        self._write_lock = threading.Lock()
        self._experiments: ReadCache[str, Experiment | None] = ReadCache()  # asked by every request

    @contextmanager
    def _writing_experiments(self) -> Iterator[Session]:
        """One transaction that changes experiments (not their request rows): drops the cached ones."""
        with self._experiments.invalidated_after(), self._write_lock, self._sessions.begin() as session:
            yield session

    # ---- experiments ----------------------------------------------------------------------------

    def add(self, experiment: Experiment) -> Experiment:
        """ExperimentNameConflictError if an experiment already has the name."""
        try:
            with self._writing_experiments() as session:
                session.add(_ExperimentRow(**_columns(experiment)))
        except IntegrityError:
            raise ExperimentNameConflictError(f"experiment {experiment.name!r} already exists") from None
        return experiment

    def get(self, name: str) -> Experiment | None:
        return self._experiments.get(name, lambda: self._get(name))

    def _get(self, name: str) -> Experiment | None:
        with self._sessions() as session:
            row = session.scalar(select(_ExperimentRow).where(_ExperimentRow.name == name))
            return _experiment(row) if row is not None else None

    def all(self) -> list[Experiment]:
        with self._sessions() as session:
            return [_experiment(r) for r in session.scalars(select(_ExperimentRow).order_by(_ExperimentRow.name))]

    def save(self, experiment: Experiment) -> Experiment:
        """Write back a changed experiment (found by name)."""
        with self._writing_experiments() as session:
            result = session.execute(
                update(_ExperimentRow).where(_ExperimentRow.name == experiment.name).values(**_columns(experiment))
            )
            if result.rowcount == 0:
                raise ExperimentNotFoundError(f"experiment {experiment.name!r} not found")
        return experiment

    def delete(self, name: str) -> None:
        """Remove an experiment with its request records (the name becomes free again)."""
        with self._writing_experiments() as session:
            experiment_id = session.scalar(select(_ExperimentRow.id).where(_ExperimentRow.name == name))
            if experiment_id is None:
                raise ExperimentNotFoundError(f"experiment {name!r} not found")
            session.execute(delete(_RequestRow).where(_RequestRow.experiment_id == experiment_id))
            session.execute(delete(_ExperimentRow).where(_ExperimentRow.id == experiment_id))

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, assignment: Assignment, key: str | None) -> None:
        """Record which variant served a request. DuplicateRequestIdError if the id is already recorded."""
        try:
            with self._write_lock, self._sessions.begin() as session:
                query = select(_ExperimentRow.id).where(_ExperimentRow.name == assignment.experiment)
                experiment_id = session.scalar(query)
                if experiment_id is None:  # deleted since the request was routed
                    raise ExperimentNotFoundError(f"experiment {assignment.experiment!r} not found")
                session.add(_RequestRow(
                    request_id=assignment.request_id, experiment_id=experiment_id,
                    variant=assignment.variant, adapter=assignment.adapter, assignment_key=key, created_at=_now(),
                ))
        except IntegrityError:
            raise DuplicateRequestIdError(
                f"request id {assignment.request_id!r} was already used in an experiment; send a unique X-Request-ID"
            ) from None

    def finish_request(self, request_id: str, outcome: Outcome) -> None:
        with self._write_lock, self._sessions.begin() as session:
            session.execute(update(_RequestRow).where(_RequestRow.request_id == request_id)
                            .values(finished_at=_now(), **asdict(outcome)))

    def score(self, request_ids: list[str], score: float,
              allowed: Callable[[str], bool] | None = None) -> Assignment:
        """Attach feedback to the first of `request_ids` (candidate spellings of one id) that was recorded;
        return its assignment. RequestNotFoundError if none was (or its experiment's name is not
        `allowed`); DuplicateFeedbackError if it has a score."""
        with self._write_lock, self._sessions.begin() as session:
            row = next(filter(None, (session.get(_RequestRow, i) for i in request_ids)), None)
            experiment = None if row is None else session.scalar(
                select(_ExperimentRow.name).where(_ExperimentRow.id == row.experiment_id))
            if row is None or (allowed is not None and not allowed(experiment)):
                raise RequestNotFoundError(f"no experiment served a request with id {request_ids[0]!r}")
            scored = session.execute(
                update(_RequestRow).where(_RequestRow.request_id == row.request_id, _RequestRow.score.is_(None))
                .values(score=score, scored_at=_now())
            )
            if scored.rowcount == 0:
                raise DuplicateFeedbackError(f"request {row.request_id!r} already has feedback")
            return Assignment(experiment, row.variant, row.adapter, row.request_id)

    def records(self, name: str) -> list[RequestRecord]:
        """Every request the experiment recorded, oldest first."""
        query = (
            select(_RequestRow).join(_ExperimentRow, _RequestRow.experiment_id == _ExperimentRow.id)
            .where(_ExperimentRow.name == name).order_by(_RequestRow.created_at)
        )
        with self._sessions() as session:
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
        min_samples=row.min_samples, created_at=_utc(row.created_at), updated_at=_utc(row.updated_at),
        started_at=_utc(row.started_at), stopped_at=_utc(row.stopped_at),
        promotion=Promotion(**{**promotion, "at": datetime.fromisoformat(promotion["at"])}) if promotion else None,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite keeps no time zone: every stored moment is UTC, so put the zone back on the way out.
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
