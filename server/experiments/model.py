"""Experiments as plain frozen records: definitions, assignments, outcomes."""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

# Where a request's assignment key comes from: "user" = the OpenAI `user` field, else the
# X-Experiment-Key header; "header" = that header only; "random" = every request drawn afresh.
# Without a key a request is drawn at random (not sticky).
AssignmentKey = Literal["user", "header", "random"]


class Status(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Variant:
    name: str
    adapter: str | None  # "name@version", pinned at creation; None = the bare base
    weight: float  # relative; 0 takes the variant out of the traffic
    control: bool = False


@dataclass(frozen=True)
class Promotion:
    """An alias pointed at a variant's adapter version when the experiment was decided."""

    alias: str
    variant: str
    adapter: str
    at: datetime


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    status: Status
    variants: tuple[Variant, ...]
    assignment_key: AssignmentKey
    min_samples: int  # scored requests each variant needs before results draw a conclusion
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    promotion: Promotion | None = None

    @property
    def control(self) -> Variant:
        """The variant marked as control, else the first."""
        return next((v for v in self.variants if v.control), self.variants[0])

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class Caller:
    """What assignment needs to know about a request."""

    request_id: str  # the middleware's id; responses are `cmpl-<id>` / `chatcmpl-<id>`
    user: str | None = None  # the OpenAI `user` field
    header_key: str | None = None  # the X-Experiment-Key header
    tenant: str | None = None  # whose request (None: an admin's): request ids are recorded per tenant


@dataclass(frozen=True)
class Assignment:
    """The variant one request was given, as recorded under its request id."""

    experiment: str
    variant: str
    adapter: str | None  # None = the bare base
    request_id: str


@dataclass(frozen=True)
class Outcome:
    """How one request ended. `error` is None when it was served, else a short code (e.g. "server_busy",
    "abort" when the engine aborted it, "cancelled" when the client left before the end)."""

    error: str | None = None
    output_tokens: int = 0
    ttft_s: float | None = None  # arrival to the first token
    latency_s: float | None = None  # arrival to the last token


@dataclass(frozen=True)
class RequestRecord:
    """One recorded request as the results read it."""

    variant: str
    finished: bool
    error: str | None
    output_tokens: int
    ttft_s: float | None
    latency_s: float | None
    score: float | None
