"""The request path's in-memory copy of catalogue answers: exact after every write, and never older than
its maximum age (replicas sharing a catalogue write behind each other's backs)."""

import time

from server.read_cache import ReadCache


def test_a_load_that_overlaps_a_write_is_not_remembered():
    cache: ReadCache[str, int] = ReadCache()
    store = {"k": 1}

    def load_during_write() -> int:
        value = store["k"]  # read before the write commits...
        store["k"] = 2
        cache.invalidate()  # ...which then invalidates
        return value

    assert cache.get("k", load_during_write) == 1
    assert cache.get("k", lambda: store["k"]) == 2, "the stale answer must not have been kept"
    assert cache.get("k", lambda: 99) == 2, "a clean load is remembered"


def test_entries_are_bounded():
    cache: ReadCache[int, int] = ReadCache(max_entries=3)
    for key in range(10):
        cache.get(key, lambda key=key: key)
    assert len(cache._values) <= 3


def test_answers_expire_so_other_processes_writes_are_seen():
    cache: ReadCache[str, int] = ReadCache(max_age_s=0.05)
    store = {"k": 1}
    assert cache.get("k", lambda: store["k"]) == 1
    store["k"] = 2  # written by another process: no invalidate() here
    assert cache.get("k", lambda: store["k"]) == 1, "fresh answers come from memory"
    time.sleep(0.06)
    assert cache.get("k", lambda: store["k"]) == 2


def test_keys_longer_than_any_name_are_answered_but_never_kept():
    cache: ReadCache[str, None] = ReadCache(max_key_chars=256)
    loads = []
    for i in range(3):
        assert cache.get("x" * 1_500_000, lambda i=i: loads.append(i)) is None
    assert loads == [0, 1, 2] and cache._values == {}, "a 1.5 MB key must not stay in memory"
    cache.get("short", lambda: None)
    assert list(cache._values) == ["short"]
