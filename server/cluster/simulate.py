"""The routing policy at a scale no test machine holds: many replicas with few device slots each, many
adapters under Zipf traffic, no model. The router's own code decides (`policy.rank`, `policy.Residency`);
a replica is a cost model: a request holds it for `tokens x step_s`, plus `load_s` when its adapter is
not in the replica's slots (a cold start: it then enters them, evicting the least recently used).
Replicas report their slots every `report_s`, as the live replicas report routing stats.

Load of a replica = requests it holds (Ray Serve's queue length). Reported: cold starts per 1,000
requests, and the spread of work, max/mean over replicas of the seconds of service each was given.
"""

import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from server.cluster.policy import ReplicaView, Residency, rank

POLICIES = ("affinity", "least-loaded", "random")


@dataclass(frozen=True)
class Scenario:
    replicas: int = 64
    slots: int = 32
    adapters: int = 5000
    zipf_s: float = 1.0
    requests: int = 200_000
    utilisation: float = 0.7  # offered work / the cluster's capacity (replicas x max_num_seqs)
    max_num_seqs: int = 64
    tokens: int = 64  # output tokens per request
    step_s: float = 0.03
    load_s: float = 0.05  # one adapter into a device slot (disk/host -> device)
    report_s: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Outcome:
    policy: str
    cold_starts_per_1000: float
    max_over_mean_work: float
    mean_latency_s: float


class _Replica:
    def __init__(self, slots: int):
        self.slots: OrderedDict[str, None] = OrderedDict()
        self.capacity = slots
        self.load = 0
        self.work_s = 0.0

    def admit(self, adapter: str) -> bool:
        """Touch `adapter` in the slots; True when it had to be loaded."""
        if adapter in self.slots:
            self.slots.move_to_end(adapter)
            return False
        if len(self.slots) >= self.capacity:
            self.slots.popitem(last=False)
        self.slots[adapter] = None
        return True


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def run(scenario: Scenario, policy: str) -> Outcome:
    rng = random.Random(scenario.seed)
    draws = np.random.default_rng(scenario.seed)
    names = [f"a{i}" for i in range(scenario.adapters)]
    picks = draws.choice(scenario.adapters, size=scenario.requests, p=zipf_weights(scenario.adapters, scenario.zipf_s))
    service_s = scenario.tokens * scenario.step_s
    rate = scenario.utilisation * scenario.replicas * scenario.max_num_seqs / service_s
    arrivals = np.cumsum(draws.exponential(1 / rate, size=scenario.requests))

    replicas = {f"r{i}": _Replica(scenario.slots) for i in range(scenario.replicas)}
    residency = Residency()
    ends: list[tuple[float, str]] = []  # (when, replica) of requests in service
    cold = 0
    latency = 0.0
    next_report = 0.0
    for now, pick in zip(arrivals, picks):
        while ends and ends[0][0] <= now:
            replicas[heapq.heappop(ends)[1]].load -= 1
        if now >= next_report:
            for rid, replica in replicas.items():
                residency.report(rid, replica.slots)
            residency.prune(now)
            next_report = now + scenario.report_s
        adapter = names[pick]
        chosen = _choose(policy, adapter, replicas, residency, now, rng)
        residency.routed(chosen, adapter, now)
        replica = replicas[chosen]
        took = service_s + (scenario.load_s if replica.admit(adapter) else 0.0)
        cold += took > service_s
        # Beyond max_num_seqs a request queues: it waits about one service time per batch ahead of it.
        took += service_s * (replica.load // scenario.max_num_seqs)
        replica.load += 1
        replica.work_s += took
        latency += took
        heapq.heappush(ends, (now + took, chosen))
    work = np.array([r.work_s for r in replicas.values()])
    return Outcome(policy, 1000 * cold / scenario.requests, float(work.max() / work.mean()),
                   latency / scenario.requests)


def _choose(policy: str, adapter: str, replicas: dict[str, _Replica], residency: Residency, now: float,
            rng: random.Random) -> str:
    if policy == "random":
        return rng.choice(list(replicas))
    views = [ReplicaView(rid, r.load) for rid, r in replicas.items()]
    holders = residency.holders(adapter, now) if policy == "affinity" else set()
    return rank(adapter, views, holders, rng=rng)[0][0]  # Ray Serve takes the least loaded of the first rank
