"""The experiment store on real SQLite: definitions, request records, feedback rules, reopening."""

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from server.db import Database
from server.experiments.errors import (
    DuplicateFeedbackError,
    DuplicateRequestIdError,
    ExperimentNameConflictError,
    ExperimentNotFoundError,
    RequestNotFoundError,
)
from server.experiments.model import Assignment, Experiment, Outcome, Promotion, Status, Variant
from server.experiments.store import ExperimentStore
from server.registry.namespace import Namespace


def _experiment(name: str = "exp") -> Experiment:
    now = datetime.now(UTC)
    return Experiment(name, "try B", Status.RUNNING, (Variant("A", "a@1", 1.0), Variant("B", None, 3.0, True)),
                      "header", 10, now, now, started_at=now)


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalogue.db'}"


def _store(url: str) -> ExperimentStore:
    database = Database(url)
    return ExperimentStore(database, Namespace(database))


def test_experiments_round_trip_and_survive_reopening(url):
    store = _store(url)
    experiment = store.add(_experiment())
    with pytest.raises(ExperimentNameConflictError):
        store.add(_experiment())
    stopped = replace(experiment, status=Status.STOPPED, stopped_at=datetime.now(UTC),
                      promotion=Promotion("prod", "A", "a@1", datetime.now(UTC)))
    store.save(stopped)
    store.add_request(Assignment("exp", "B", None, "req-1"), key="user-9")
    store.finish_request("req-1", Outcome(None, 7, 0.01, 0.05))

    reopened = _store(url)
    assert reopened.get("exp") == stopped and reopened.get("other") is None
    assert [e.name for e in reopened.all()] == ["exp"]
    [record] = reopened.records("exp")
    assert (record.variant, record.finished, record.output_tokens, record.latency_s) == ("B", True, 7, 0.05)


def test_feedback_once_per_request_by_request_or_response_id(url):
    store = _store(url)
    store.add(_experiment())
    store.add_request(Assignment("exp", "A", "a@1", "abc"), key=None)
    with pytest.raises(DuplicateRequestIdError):
        store.add_request(Assignment("exp", "B", None, "abc"), key=None)
    assert store.score(["cmpl-abc", "abc"], 1.0) == Assignment("exp", "A", "a@1", "abc")
    with pytest.raises(DuplicateFeedbackError):
        store.score(["abc"], 0.0)
    with pytest.raises(RequestNotFoundError):
        store.score(["nope"], 1.0)
    assert store.records("exp")[0].score == 1.0 and not store.records("exp")[0].finished


def test_delete_removes_records_and_frees_the_name(url):
    store = _store(url)
    store.add(_experiment())
    store.add_request(Assignment("exp", "A", "a@1", "r1"), key=None)
    store.delete("exp")
    with pytest.raises(ExperimentNotFoundError):
        store.delete("exp")
    with pytest.raises(RequestNotFoundError):
        store.score(["r1"], 1.0)
    store.add(_experiment())
    assert store.records("exp") == []
