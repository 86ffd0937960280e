"""The status an experiment moves through: draft -> running <-> paused -> stopped (final), and what a
request to one that is not running is told."""

from dataclasses import replace
from datetime import datetime

from server.experiments.errors import InvalidTransitionError
from server.experiments.model import Experiment, Status

# Stopped is final: restarting would mix two periods' traffic in one set of results.
_TRANSITIONS = {
    Status.DRAFT: {Status.RUNNING, Status.STOPPED},
    Status.RUNNING: {Status.PAUSED, Status.STOPPED},
    Status.PAUSED: {Status.RUNNING, Status.STOPPED},
    Status.STOPPED: set(),
}


def with_status(experiment: Experiment, status: Status, now: datetime) -> Experiment:
    """The experiment moved to `status` (unchanged if already there), its start and stop times kept:
    started_at is the first time it ran. InvalidTransitionError for a move the lifecycle forbids."""
    if status is experiment.status:
        return experiment
    if status not in _TRANSITIONS[experiment.status]:
        raise InvalidTransitionError(f"an experiment cannot go from {experiment.status.value} to {status.value}")
    return replace(
        experiment, status=status,
        started_at=experiment.started_at or (now if status is Status.RUNNING else None),
        stopped_at=now if status is Status.STOPPED else experiment.stopped_at,
    )


def not_running_message(experiment: Experiment) -> str:
    name = experiment.name
    resume = f"PATCH /v1/experiments/{name} with {{\"status\": \"running\"}}"
    if experiment.status is Status.DRAFT:
        return f"experiment {name!r} is a draft and serves no traffic yet; start it with {resume}"
    if experiment.status is Status.PAUSED:
        return f"experiment {name!r} is paused and serves no traffic; resume it with {resume}"
    if experiment.promotion is not None:
        return f"experiment {name!r} is stopped; its winner is served as {experiment.promotion.alias!r}"
    return f"experiment {name!r} is stopped and serves no traffic; call an adapter directly"
