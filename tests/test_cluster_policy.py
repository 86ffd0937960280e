"""The routing policy alone (server/cluster/policy.py) and the simulator that runs it at scale."""

import random

from server.cluster.policy import ReplicaView, Residency, rank
from server.cluster.simulate import Scenario, run

VIEWS = [ReplicaView("r0", 3), ReplicaView("r1", 0), ReplicaView("r2", 1)]


def test_a_holder_under_the_load_line_comes_first_then_the_least_loaded():
    assert rank("x", VIEWS, holders={"r0"}) == [["r0"], ["r1", "r2"]]  # mean 1.33: the line is 3.33


def test_a_holder_over_the_load_line_spills_to_the_least_loaded():
    crowded = [ReplicaView("r0", 9), ReplicaView("r1", 0), ReplicaView("r2", 1)]  # mean 3.33, line 5.33
    assert rank("x", crowded, holders={"r0"}) == [["r1", "r2", "r0"]]


def test_base_requests_and_unknown_adapters_go_to_the_least_loaded_ties_at_random():
    assert rank(None, VIEWS, holders={"r0"}) == [["r1", "r2", "r0"]]
    idle = [ReplicaView(f"r{i}", 0) for i in range(4)]
    firsts = {rank("new", idle, set(), rng=random.Random(seed))[0][0] for seed in range(40)}
    assert firsts == {"r0", "r1", "r2", "r3"}


def test_residency_is_the_last_report_plus_recent_routing():
    residency = Residency(hold_s=5.0)
    residency.report("r0", {"a"})
    residency.routed("r1", "a", now=100.0)
    assert residency.holders("a", now=104.0) == {"r0", "r1"}
    assert residency.holders("a", now=105.5) == {"r0"}  # r1 never reported it: the note ran out
    residency.report("r0", set())
    assert residency.holders("a", now=105.5) == set() and residency.holders(None, now=0) == set()


def test_at_scale_affinity_cuts_cold_starts_and_keeps_the_load_even():
    # 1.6 adapters per device slot, Zipf traffic: seeded, so the figures are the same on every run.
    scenario = Scenario(replicas=16, slots=8, adapters=200, requests=20_000, utilisation=0.7)
    affinity, random_ = run(scenario, "affinity"), run(scenario, "random")
    assert affinity.cold_starts_per_1000 < random_.cold_starts_per_1000 / 3
    assert affinity.max_over_mean_work <= 1.25
