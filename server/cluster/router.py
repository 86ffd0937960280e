"""Ray Serve request routers for the engine replicas.

Why a custom request router and not Ray Serve's model multiplexing: multiplexing tracks the model ids
its own per-replica LRU loaded, while what a request should follow is what the engine holds in its
device slots (its own LRU, merged copies, retirements); its fallback also waits up to a matching
timeout before spreading. Here each replica reports its engine's resident adapters as routing stats
(`EngineReplica.record_routing_stats`), the ingress names the adapter as the request's
`multiplexed_model_id` (the `model` as sent; aliases are mapped to their targets here, from the alias
table the replicas report with their residents), and `server/cluster/policy.py` (shared with the
simulator) ranks replicas;
Ray Serve still probes queue lengths, applies `max_ongoing_requests` and backs off.
"""

import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from server.cluster.channel import PIN, replicas_now
from server.cluster.policy import ReplicaView, Residency, affinity_key, rank

_PRUNE_EVERY_S = 30.0


def _model(pending: PendingRequest | None) -> str | None:
    return (pending.metadata.multiplexed_model_id or None) if pending is not None else None


def _pinned(pending: PendingRequest | None, candidates: list[RunningReplica]) -> list[list[RunningReplica]] | None:
    """An ingress's channel goes to the one replica it names (none while that replica is not running:
    Ray Serve waits, and the ingress gives up); None for every other request."""
    model = _model(pending)
    if model is None or not model.startswith(PIN):
        return None
    named = [r for r in candidates if r.replica_id.unique_id == model[len(PIN):]]
    return [named] if named else []


class _ChannelsFollowReplicas(RequestRouter):
    """Tells the ingress in this process which replicas run (server/cluster/channel.py).

    No FIFOMixin on these routers: with it, a replica chosen for one request goes to whichever request is
    first in the queue, so under concurrency an adapter's request (or a channel pinned to one replica)
    could take the replica chosen for another; without it, each choice serves the request it was made for.
    """

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        replicas_now({r.replica_id.unique_id for r in replicas})


class AdapterAffinityRouter(_ChannelsFollowReplicas):
    """Requests for an adapter go to a replica holding it unless it is over the load line; base
    requests and spills go to the least loaded replica."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._residency = Residency(**kwargs)
        self._pruned = time.monotonic()
        self._aliases: dict[str, str] = {}  # alias -> name@version, as the replicas last reported

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if (pinned := _pinned(pending_request, candidate_replicas)) is not None:
            return pinned
        now = time.monotonic()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        for replica_id, replica in by_id.items():
            stats = replica.routing_stats or {}
            self._residency.report(replica_id, stats.get("adapters", ()))
            if "aliases" in stats:  # one catalogue: every replica reports the same table
                self._aliases = stats["aliases"]
        views = [ReplicaView(rid, self.replica_queue_len_cache.get(r.replica_id) or 0) for rid, r in by_id.items()]
        adapter = affinity_key(_model(pending_request), self._aliases)
        if now - self._pruned > _PRUNE_EVERY_S:
            self._residency.prune(now)
            self._pruned = now
        return [[by_id[i] for i in ids] for ids in rank(adapter, views, self._residency.holders(adapter, now))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if (_model(pending_request) or "").startswith(PIN):
            return
        self._residency.routed(replica_id.unique_id, affinity_key(_model(pending_request), self._aliases),
                               time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._residency.forget(replica_id.unique_id)


class RandomRouter(_ChannelsFollowReplicas):
    """Any replica with room, at random: the baseline the benchmark compares affinity against."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if (pinned := _pinned(pending_request, candidate_replicas)) is not None:
            return pinned
        return [random.sample(candidate_replicas, len(candidate_replicas))] if candidate_replicas else []


ROUTERS = {"affinity": AdapterAffinityRouter, "random": RandomRouter}
