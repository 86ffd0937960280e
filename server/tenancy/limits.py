"""Per-tenant limits on traffic: requests and tokens per minute (token buckets, refilled continuously)
and requests in flight at once. In memory, per server process; server/tenancy/shared_limits.py counts
the same limits in the catalogue database for processes that share it (`--shared-limits`)."""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.tenancy.errors import RateLimitedError


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: now), after refilling at capacity per minute."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60)
        self.updated = now
        return 0.0 if self.level >= amount else (min(amount, self.capacity) - self.level) * 60 / self.capacity


@dataclass
class _Tenant:
    requests: _Bucket
    tokens: _Bucket
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TenantLimiter:
    """0 for a limit means none."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, max_concurrent: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.max_concurrent = requests_per_minute, tokens_per_minute, max_concurrent
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._lock = threading.Lock()

    def admit(self, tenant: str, tokens: int) -> Callable[[], None]:
        """Count one request of up to `tokens` tokens against the tenant, or raise RateLimitedError
        (with the seconds to wait). Returns the release to call, once, when the request ends."""
        state = self._state(tenant)
        now = self._clock()
        with state.lock:
            if self.max_concurrent and state.in_flight >= self.max_concurrent:
                raise RateLimitedError(f"too many requests in flight (limit {self.max_concurrent})", 1)
            waits = [(state.requests.wait_for(1, now) if self.rpm else 0.0, "requests per minute", self.rpm),
                     (state.tokens.wait_for(tokens, now) if self.tpm else 0.0, "tokens per minute", self.tpm)]
            wait, what, limit = max(waits)
            if wait > 0:
                raise RateLimitedError(f"rate limit of {limit} {what} reached", math.ceil(wait))
            if self.rpm:
                state.requests.level -= 1
            if self.tpm:
                state.tokens.level -= min(tokens, self.tpm)
            state.in_flight += 1
        done = [False]

        def release() -> None:
            with state.lock:
                if not done[0]:
                    done[0] = True
                    state.in_flight -= 1

        return release

    def _state(self, tenant: str) -> _Tenant:
        with self._lock:
            if tenant not in self._tenants:
                now = self._clock()
                requests, tokens = _Bucket(self.rpm or 1, self.rpm, now), _Bucket(self.tpm or 1, self.tpm, now)
                self._tenants[tenant] = _Tenant(requests, tokens)
            return self._tenants[tenant]
