"""Where a request goes: adapter affinity with a load line. Pure code, no Ray: the live router
(server/cluster/router.py) and the 64-replica simulator (server/cluster/simulate.py) both call it.

Rule, for a request naming adapter X (`None` = the base model):
- rank 0: the replicas that hold X (resident, or sent X within the last `hold_s`) whose load is under
  the line `max(spill x mean load, mean load + slack)`;
- rank 1: X's home, if under the line: the replica that rendezvous hashing gives X among those present
  (every router agrees on it, and it moves only for the adapters of a replica that comes or goes), so
  an adapter that no replica holds now still goes where it went before and each replica sees its own
  share of the adapters instead of all of them;
- rank 2: every other replica.
An adapter is routed by its affinity key (`affinity_key`): an alias by the version it points to, so an alias
and its adapter share holders and a home; homes hash the adapter's name alone, so `x`, `x@2` and an alias
of `x@2` have one home.
Within a rank the least loaded wins (Ray Serve does that part with fresh queue lengths). A hot adapter
whose holders all cross the line spills to its home or the least loaded replica, which loads it: it ends
up on several replicas; a cold one stays on one. Base requests have no holders and no home: least loaded.
"""

import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

SPILL = 1.2  # a holder may carry 20% more than the mean before a request goes elsewhere
SLACK = 2.0  # ...or two requests more: at low load, a cold start costs more than a short queue
# A routing decision counts as residency until the replica's own report (every 0.5 s) has caught up with it:
# kept longer, notes claim adapters a few-slot replica evicted long ago, and affinity decays to random.
HOLD_S = 1.0
CANDIDATES = 4  # replicas per rank handed to Ray Serve (it probes their queue lengths)


@dataclass(frozen=True)
class ReplicaView:
    id: str
    load: float  # requests in flight (queued or running)


def rank(adapter: str | None, replicas: Sequence[ReplicaView], holders: set[str], spill: float = SPILL,
         slack: float = SLACK, per_rank: int = CANDIDATES, rng: random.Random | None = None) -> list[list[str]]:
    """Replica ids in ranks of preference (see the module docstring); each rank least loaded first,
    ties in random order (idle replicas share base traffic)."""
    if not replicas:
        return []
    draw = (rng or random).random
    by_load = sorted(replicas, key=lambda r: (r.load, draw()))
    mean = sum(r.load for r in replicas) / len(replicas)
    line = max(spill * mean, mean + slack)
    first = [r.id for r in by_load if adapter is not None and r.id in holders and r.load < line]
    home = [] if adapter is None else [r.id for r in replicas if r.id == home_of(adapter, replicas)
                                       and r.load < line and r.id not in first]
    rest = [r.id for r in by_load if r.id not in first and r.id not in home]
    return [ids[:per_rank] for ids in (first, home, rest) if ids]


def affinity_key(model: str | None, aliases: Mapping[str, str]) -> str | None:
    """What a request naming `model` routes by: an alias's target (`name@version`), else `model` as sent
    (an adapter's `name` or `name@version`; an experiment's name, whose variant only the replica picks)."""
    return aliases.get(model, model) if model else None


def name_of(key: str) -> str:
    return key.partition("@")[0]


def home_of(adapter: str, replicas: Sequence[ReplicaView]) -> str:
    """Rendezvous (highest random weight) hashing of the adapter's name: the replica whose hash with it is
    highest."""
    name = name_of(adapter)
    return max(replicas, key=lambda r: zlib.crc32(f"{name}\0{r.id}".encode())).id


@dataclass
class Residency:
    """Which adapters each replica holds, as far as the router knows: the replica's last report (its
    engine's device slots) plus what was routed to it since, for `hold_s` (a report lags by up to its
    period; without this, a burst for a new adapter would spread over every replica)."""

    hold_s: float = HOLD_S
    _reported: dict[str, frozenset[str]] = field(default_factory=dict)
    _routed: dict[str, dict[str, float]] = field(default_factory=dict)  # replica -> adapter -> when

    def report(self, replica: str, adapters: Iterable[str]) -> None:
        self._reported[replica] = frozenset(adapters)

    def routed(self, replica: str, adapter: str | None, now: float) -> None:
        """Note `adapter` (`name@version` also as `name`, as replicas report) as sent to `replica`."""
        if adapter is not None:
            notes = self._routed.setdefault(replica, {})
            notes[adapter] = notes[name_of(adapter)] = now

    def forget(self, replica: str) -> None:
        self._reported.pop(replica, None)
        self._routed.pop(replica, None)

    def holders(self, adapter: str | None, now: float) -> set[str]:
        if adapter is None:
            return set()
        found = {r for r, held in self._reported.items() if adapter in held}
        for replica, sent in self._routed.items():
            when = sent.get(adapter)
            if when is not None and now - when < self.hold_s:
                found.add(replica)
        return found

    def prune(self, now: float) -> None:
        """Drop routing notes older than `hold_s` (call now and then: keeps memory bounded)."""
        for replica, sent in self._routed.items():
            self._routed[replica] = {a: t for a, t in sent.items() if now - t < self.hold_s}
