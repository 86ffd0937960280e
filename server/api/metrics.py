"""Prometheus metrics: per-adapter and per-experiment-variant request counters and latency histograms,
engine gauges on scrape."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.async_engine import AsyncEngine
from server.engine.model_loader import BaseFootprint
from server.experiments.model import Assignment, Outcome

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several servers in one process (tests) do not collide."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["adapter"]
        self.requests = Counter("loraserve_requests", "Inference requests finished.", ["adapter", "endpoint", "finish_reason"],
                                registry=self.registry)
        self.errors = Counter("loraserve_request_errors", "Requests refused or failed.", ["adapter", "status"],
                              registry=self.registry)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry)
        self.output_tokens = Counter("loraserve_output_tokens", "Tokens generated.", labels, registry=self.registry)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "Between consecutive tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("loraserve_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.adapter_loads = Histogram("loraserve_adapter_load_seconds", "Adapter loads into a tier, and their time.",
                                       ["tier"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.experiments = ExperimentMetrics(self.registry)

    def watch_engine(self, engine: AsyncEngine) -> None:
        self.registry.register(_EngineCollector(engine))

    def watch_base(self, footprint: BaseFootprint) -> None:
        """The base's resident bytes, labelled with its quantization (fixed from load on)."""
        gauge = Gauge("loraserve_base_resident_bytes", "Bytes the base model holds in memory, by quantization.",
                      ["quantization"], registry=self.registry)
        gauge.labels(footprint.quantization).set(footprint.resident_bytes)


class ExperimentMetrics:
    """Per experiment and variant: requests by outcome, tokens, latencies, feedback (mean = sum / count)."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["experiment", "variant"]
        self.requests = Counter("loraserve_experiment_requests", "Experiment requests finished, by outcome "
                                "('ok' or an error code).", [*labels, "outcome"], registry=registry)
        self.output_tokens = Counter("loraserve_experiment_output_tokens", "Tokens generated.", labels,
                                     registry=registry)
        self.ttft = Histogram("loraserve_experiment_time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("loraserve_experiment_request_latency_seconds", "Arrival to last token.", labels,
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.scores = Summary("loraserve_experiment_feedback_score", "Feedback scores received.", labels,
                              registry=registry)

    def outcome(self, assignment: Assignment, outcome: Outcome) -> None:
        labels = (assignment.experiment, assignment.variant)
        self.requests.labels(*labels, outcome.error or "ok").inc()
        self.output_tokens.labels(*labels).inc(outcome.output_tokens)
        if outcome.error is None and outcome.ttft_s is not None:
            self.ttft.labels(*labels).observe(outcome.ttft_s)
            self.latency.labels(*labels).observe(outcome.latency_s)

    def feedback(self, assignment: Assignment, score: float) -> None:
        self.scores.labels(assignment.experiment, assignment.variant).observe(score)


class _EngineCollector:
    """The engine's state at scrape time, read from its latest published snapshot (never the engine)."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    def collect(self):
        snap = self._engine.snapshot
        yield _gauge("loraserve_queue_depth", "Requests waiting for admission.", snap.waiting)
        yield _gauge("loraserve_running_batch_size", "Sequences in the running batch.", snap.running)
        yield _gauge("loraserve_kv_cache_usage_ratio", "Share of KV-cache blocks in use.", snap.kv_usage)
        yield _gauge("loraserve_prefix_cache_blocks", "KV blocks the prefix cache can hand out (held or not).",
                     snap.prefix_cached_blocks)
        yield _gauge("loraserve_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache.",
                     snap.prefix_hit_rate)
        yield _counter("loraserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                       snap.prefix_queried_tokens)
        yield _counter("loraserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                       snap.prefix_hit_tokens)
        yield _counter("loraserve_prefix_cache_evictions", "Cached KV blocks evicted to make room.",
                       snap.prefix_evictions)
        yield _gauge("loraserve_device_adapters", "Adapters resident in device slots.", len(snap.device_adapters))
        yield _gauge("loraserve_merged_adapters", "Adapters with a merged copy.", len(snap.merged))
        yield _gauge("loraserve_merged_bytes", "Bytes held by merged copies.", snap.merged_bytes)
        yield _gauge("loraserve_retiring_adapters", "Deleted adapters still used by running requests.",
                     len(snap.retiring))
        yield _counter("loraserve_merge_promotions", "Merged copies installed.", snap.merge_promotions)
        yield _counter("loraserve_merge_demotions", "Merged copies dropped.", snap.merge_demotions)
        yield _counter("loraserve_merge_failures", "Merged copies whose build failed.", snap.merge_failures)
        shares = GaugeMetricFamily("loraserve_adapter_traffic_share", "Decayed share of recent tokens.",
                                   labels=["adapter"])
        for name, share in snap.traffic_shares.items():
            shares.add_metric([name], share)
        yield shares
        yield _counter("loraserve_device_adapter_loads", "Adapter loads into device slots.", snap.slot_loads)
        yield _counter("loraserve_device_adapter_evictions", "Adapters evicted from device slots.", snap.slot_evictions)
        yield _counter("loraserve_device_adapter_moves", "Residents moved to keep slots sorted by rank.", snap.slot_moves)
        yield _counter("loraserve_device_adapter_load_seconds", "Time spent loading adapters into slots.",
                       snap.slot_load_seconds)
        yield _counter("loraserve_preemptions", "Sequences preempted for lack of KV cache.", snap.preemptions)
        yield _counter("loraserve_engine_steps", "Forward passes run.", snap.steps)
        yield _counter("loraserve_engine_step_seconds", "Time spent in engine steps (schedule, forward, sample).",
                       snap.step_seconds)
        yield _counter("loraserve_merged_steps", "Forward passes run entirely on merged weights.", snap.merged_steps)
        yield _counter("loraserve_mixed_merged_steps", "Forward passes on a merged copy with other adapters.",
                       snap.mixed_merged_steps)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
