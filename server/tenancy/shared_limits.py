"""Per-tenant limits counted in the catalogue database, so every process sharing it (the replicas of
`loraserve cluster`) enforces one limit together: K requests a minute is K for the cluster, not K per
replica.

- Requests and tokens per minute: one row per tenant holds both token buckets (levels and the moment
  they were last refilled); each admission is one write transaction that refills, checks and takes
  (a row lock on PostgreSQL; SQLite's write lock). The bucket arithmetic is `limits._Bucket`'s.
- Requests in flight: one row per (tenant, process); a process adds and removes its own, and refreshes
  its rows' lease every few seconds, so a replica that died stops counting after `LEASE_S`.
- The database out of reach: the process falls back to counting alone (limits per replica), as it does
  for the rest of its answers, and says so in the log once.
"""

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Float, Integer, String, delete, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.config import Settings
from server.db import Base, Database, UtcDateTime
from server.errors import DatabaseUnavailableError
from server.tenancy.errors import RateLimitedError
from server.tenancy.limits import TenantLimiter, _Bucket

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a process's in-flight count stops counting this long after its last refresh


class _BucketRow(Base):
    __tablename__ = "tenant_buckets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests: Mapped[float] = mapped_column(Float)
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _InFlightRow(Base):
    __tablename__ = "tenant_in_flight"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(96), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    lease_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class SharedTenantLimiter:
    """`TenantLimiter`'s interface and limits (0 = none), counted across processes."""

    def __init__(self, database: Database, requests_per_minute: int, tokens_per_minute: int,
                 max_concurrent: int, clock: Callable[[], float] = time.time):
        self.rpm, self.tpm, self.max_concurrent = requests_per_minute, tokens_per_minute, max_concurrent
        self._db = database
        self._clock = clock  # wall time: replicas on several machines compare it
        self._holder = f"{socket.gethostname()[:48]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._alone = TenantLimiter(requests_per_minute, tokens_per_minute, max_concurrent)
        self._warned = False
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_leases, name="loraserve-limit-lease", daemon=True).start()

    def admit(self, tenant: str, tokens: int) -> Callable[[], None]:
        """Count one request of up to `tokens` tokens, or raise RateLimitedError; returns the release."""
        try:
            self._db.write(lambda session: self._take(session, tenant, tokens))
        except DatabaseUnavailableError:
            if not self._warned:
                self._warned = True
                log.warning("the catalogue database cannot be reached: tenant limits are counted by this "
                            "process alone until it is back")
            return self._alone.admit(tenant, tokens)
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                try:
                    self._db.write(lambda session: self._give_back(session, tenant))
                except DatabaseUnavailableError:
                    pass  # the lease runs out instead

        return release

    def close(self) -> None:
        self._stop.set()

    def _take(self, session: Session, tenant: str, tokens: int) -> None:
        now = self._clock()
        if self.max_concurrent:
            fresh = _moment(now - LEASE_S)
            in_flight = session.scalar(select(func.coalesce(func.sum(_InFlightRow.count), 0)).where(
                _InFlightRow.tenant == tenant, _InFlightRow.lease_at > fresh))
            if in_flight >= self.max_concurrent:
                raise RateLimitedError(f"too many requests in flight (limit {self.max_concurrent})", 1)
        if self.rpm or self.tpm:
            self._take_from_buckets(session, tenant, tokens, now)
        mine = session.get(_InFlightRow, (tenant, self._holder))
        if mine is None:
            session.add(_InFlightRow(tenant=tenant, holder=self._holder, count=1, lease_at=_moment(now)))
        else:
            mine.count, mine.lease_at = mine.count + 1, _moment(now)

    def _take_from_buckets(self, session: Session, tenant: str, tokens: int, now: float) -> None:
        # The bucket's clock has the stored resolution (microseconds): credit computed from an unrounded
        # `now` and a rounded `updated_at` came up to a microsecond's worth short half of the time.
        now = _moment(now).timestamp()
        row = session.get(_BucketRow, tenant, with_for_update=True)
        if row is None:  # a concurrent first insert fails its unique key; Database.write runs this again
            row = _BucketRow(tenant=tenant, requests=float(self.rpm), tokens=float(self.tpm), updated_at=_moment(now))
            session.add(row)
        updated = min(row.updated_at.timestamp(), now)  # a replica whose clock is behind takes nothing
        requests = _Bucket(self.rpm or 1, row.requests, updated)
        token_bucket = _Bucket(self.tpm or 1, row.tokens, updated)
        waits = [(requests.wait_for(1, now) if self.rpm else 0.0, "requests per minute", self.rpm),
                 (token_bucket.wait_for(tokens, now) if self.tpm else 0.0, "tokens per minute", self.tpm)]
        wait, what, limit = max(waits)
        if wait > 0:
            raise RateLimitedError(f"rate limit of {limit} {what} reached", math.ceil(wait))
        row.requests = requests.level - (1 if self.rpm else 0)
        row.tokens = token_bucket.level - (min(tokens, self.tpm) if self.tpm else 0)
        row.updated_at = _moment(now)

    def _give_back(self, session: Session, tenant: str) -> None:
        session.execute(update(_InFlightRow).where(
            _InFlightRow.tenant == tenant, _InFlightRow.holder == self._holder, _InFlightRow.count > 0,
        ).values(count=_InFlightRow.count - 1))

    def refresh_leases(self) -> None:
        """Keep this process's in-flight rows counting; drop rows dead for ten leases."""
        now = self._clock()

        def refresh(session: Session) -> None:
            session.execute(update(_InFlightRow).where(
                _InFlightRow.holder == self._holder, _InFlightRow.count > 0).values(lease_at=_moment(now)))
            session.execute(delete(_InFlightRow).where(_InFlightRow.lease_at < _moment(now - 10 * LEASE_S)))

        self._db.write(refresh)

    def _refresh_leases(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            try:
                self.refresh_leases()
            except DatabaseUnavailableError:
                continue


def limiter_for(settings: Settings, database: Database) -> TenantLimiter | SharedTenantLimiter:
    """The limiter `settings.shared_limits` asks for: counted in `database`, or by this process alone."""
    limits = (settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute, settings.tenant_max_concurrent)
    return SharedTenantLimiter(database, *limits) if settings.shared_limits else TenantLimiter(*limits)
