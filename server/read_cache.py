"""An in-memory copy of a store's answers, dropped at every write to its tables and after a second.

Every inference request asks the catalogue the same questions ("which version does `model` name?",
"is it an experiment?"); answering them from SQLite costs about a millisecond each on the event loop,
which a server streaming thousands of tokens a second cannot spare. This process's own writes drop the
copy at once (server/db/database.py calls `invalidate` once such a write has committed); an answer
also expires after `max_age_s`, so replicas sharing one catalogue see each other's writes within that
time. When reloading an expired answer fails with one of `stale_on` (the database cannot be reached),
the last answer is given instead: a replica cut off from its catalogue keeps serving what it knew.
"""

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from server.errors import DatabaseUnavailableError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    """`get(key, load)` answers from memory, or loads and remembers; `invalidate()` after every write.

    A load that overlapped a write is returned but not remembered (the generation moved), so a reader
    can never put back an answer from before the write. Exceptions are not remembered. Keys come from
    clients: at most `max_entries` are kept, and a string key longer than `max_key_chars` (longer than
    anything a store could hold) is answered but never kept, so the copy stays bounded in bytes."""

    def __init__(self, max_entries: int = 4096, max_age_s: float = 1.0, max_key_chars: int = 256,
                 stale_on: tuple[type[BaseException], ...] = ()):
        self._values: dict[K, tuple[float, V]] = {}  # key -> (when loaded, answer)
        self._stale_on = stale_on
        self._generation = 0
        self._max_entries = max_entries
        self._max_age_s = max_age_s
        self._max_key_chars = max_key_chars

    def get(self, key: K, load: Callable[[], V]) -> V:
        now = time.monotonic()
        remembered = self._values.get(key)
        if remembered is not None and now - remembered[0] < self._max_age_s:
            return remembered[1]
        generation = self._generation
        try:
            value = load()
        except self._stale_on as exc:
            if remembered is None:
                raise DatabaseUnavailableError("the catalogue database cannot be reached") from exc
            return remembered[1]
        if isinstance(key, str) and len(key) > self._max_key_chars:
            return value
        if generation == self._generation:
            if len(self._values) >= self._max_entries:
                self._values = {}
            self._values[key] = (now, value)
        return value

    def invalidate(self) -> None:
        self._generation += 1
        self._values = {}
