"""The routing policy alone (server/cluster/policy.py) and the simulator that runs it at scale."""

import random

from server.cluster.policy import ReplicaView, Residency, affinity_key, home_of, rank
from server.cluster.simulate import Scenario, run

VIEWS = [ReplicaView("r0", 3), ReplicaView("r1", 0), ReplicaView("r2", 1)]


def _flat(ranks: list[list[str]]) -> list[str]:
    return [replica for ids in ranks for replica in ids]


def test_a_holder_under_the_load_line_comes_first_then_the_adapters_home_then_the_least_loaded():
    adapter = next(a for a in (f"x{i}" for i in range(100)) if home_of(a, VIEWS) == "r2")
    assert rank(adapter, VIEWS, holders={"r0"}) == [["r0"], ["r2"], ["r1"]]  # mean 1.33: the line is 3.33
    assert rank(adapter, VIEWS, holders=set()) == [["r2"], ["r1", "r0"]]


def test_a_holder_over_the_load_line_spills_to_the_home_or_the_least_loaded():
    crowded = [ReplicaView("r0", 9), ReplicaView("r1", 0), ReplicaView("r2", 1)]  # mean 3.33, line 5.33
    for adapter in (f"x{i}" for i in range(20)):
        ranks = rank(adapter, crowded, holders={"r0"})
        assert sorted(_flat(ranks)) == ["r0", "r1", "r2"] and _flat(ranks)[-1] == "r0"  # the holder last
        home = home_of(adapter, crowded)
        assert ranks == ([[home], [r for r in ("r1", "r2", "r0") if r != home]] if home != "r0"
                         else [["r1", "r2", "r0"]])


def test_every_router_agrees_on_a_home_and_it_moves_only_with_its_replica():
    views = [ReplicaView(f"r{i}", 0) for i in range(8)]
    homes = {f"a{i}": home_of(f"a{i}", views) for i in range(400)}
    assert len(set(homes.values())) == 8  # spread over every replica
    fewer = [v for v in views if v.id != "r3"]
    assert all(home_of(a, fewer) == h for a, h in homes.items() if h != "r3")


def test_an_alias_routes_with_the_version_it_points_to_and_versions_share_their_names_home():
    aliases = {"prod": "bot@3"}
    assert [affinity_key(m, aliases) for m in ("prod", "bot", "bot@2", None)] == ["bot@3", "bot", "bot@2", None]
    views = [ReplicaView(f"r{i}", 0) for i in range(8)]
    for name in (f"bot{i}" for i in range(50)):
        assert home_of(name, views) == home_of(f"{name}@3", views) == home_of(f"{name}@17", views)
    residency = Residency(hold_s=1.0)
    residency.report("r0", {"bot@3", "bot"})  # replicas report name@version and name
    residency.routed("r1", affinity_key("prod", aliases), now=10.0)
    assert residency.holders(affinity_key("prod", aliases), now=10.5) == {"r0", "r1"}
    assert residency.holders("bot", now=10.5) == {"r0", "r1"}
    assert residency.holders("bot@2", now=10.5) == set()


def test_base_requests_go_to_the_least_loaded_ties_at_random():
    assert rank(None, VIEWS, holders={"r0"}) == [["r1", "r2", "r0"]]
    idle = [ReplicaView(f"r{i}", 0) for i in range(4)]
    firsts = {rank(None, idle, set(), rng=random.Random(seed))[0][0] for seed in range(40)}
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
