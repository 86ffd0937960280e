"""An in-memory copy of a store's answers, dropped at every write to that store.

Every inference request asks the catalogue the same questions ("which version does `model` name?",
"is it an experiment?"); answering them from SQLite costs about a millisecond each on the event loop,
which a server streaming thousands of tokens a second cannot spare. The stores are written only
through this process, so dropping everything at each write keeps the copy exact.
"""

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    """`get(key, load)` answers from memory, or loads and remembers; `invalidate()` after every write.

    A load that overlapped a write is returned but not remembered (the generation moved), so a reader
    can never put back an answer from before the write. Exceptions are not remembered."""

    def __init__(self, max_entries: int = 4096):
        self._values: dict[K, V] = {}
        self._generation = 0
        self._max_entries = max_entries  # keys come from clients: bound what unknown names can fill

    def get(self, key: K, load: Callable[[], V]) -> V:
        try:
            return self._values[key]
        except KeyError:
            pass
        generation = self._generation
        value = load()
        if generation == self._generation:
            if len(self._values) >= self._max_entries:
                self._values = {}
            self._values[key] = value
        return value

    def invalidate(self) -> None:
        self._generation += 1
        self._values = {}

    @contextmanager
    def invalidated_after(self) -> Iterator[None]:
        """Wrap a write: the copy is dropped once it has committed (or failed)."""
        try:
            yield
        finally:
            self.invalidate()
