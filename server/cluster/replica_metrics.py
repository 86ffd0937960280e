"""Each replica's engine, in Ray's metrics export: gauges set from the engine's latest snapshot every time
the router asks the replica for its routing stats (every 0.5 s). Ray Serve adds the `deployment`,
`replica` and `application` labels; Ray's metrics agent on each node serves them to Prometheus (its
service-discovery file lists the nodes: deploy/prometheus.yml). Counters are exported as the engine's
running totals (gauges that only grow: use `rate()` on them as on counters).

The replicas' own `/metrics` (the single server's, every per-adapter series) stays reachable through
the ingress, answered by whichever replica the request lands on (its `X-Replica` header says which)."""

from ray.serve.metrics import Gauge

from server.engine.snapshot import EngineSnapshot

_FIELDS = {
    "running": "Requests in the running batch.",
    "waiting": "Requests waiting for admission.",
    "kv_free_blocks": "Free KV-cache blocks.",
    "steps": "Engine steps since start.",
    "tokens_generated": "Tokens generated since start.",
    "slot_loads": "Adapters loaded into device slots since start (cold starts).",
    "slot_evictions": "Adapters evicted from device slots since start.",
    "preemptions": "Sequences preempted since start.",
}


class ReplicaMetrics:
    def __init__(self):
        self._gauges = {name: Gauge(f"loraserve_replica_{name}", description=text) for name, text in _FIELDS.items()}
        self._resident = Gauge("loraserve_replica_device_adapters", description="Adapters in device slots.")

    def update(self, snap: EngineSnapshot) -> None:
        for name, gauge in self._gauges.items():
            gauge.set(getattr(snap, name))
        self._resident.set(len(snap.device_adapters))
