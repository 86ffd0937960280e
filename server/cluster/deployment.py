"""The Ray Serve application: `Ingress` in front of `replicas` x `EngineReplica`, routed by
`server/cluster/router.py`. `build_app` for `loraserve cluster` and the tests; `app_builder` for a Ray
Serve config file (deploy/serve.yaml), whose replicas read their settings from LORASERVE_* variables."""

from pathlib import Path
from typing import Literal

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from server.cluster.ingress import Ingress
from server.cluster.replica import EngineReplica
from server.cluster.router import ROUTERS
from server.config import Settings

APP_NAME = "loraserve"
# Replicas report their resident adapters this often; the router also remembers its own decisions.
ROUTING_STATS_PERIOD_S = 0.5
# The app logs each request itself (with its request id); Ray Serve's own line per call would double that.
_LOGGING = LoggingConfig(enable_access_log=False)
INGRESS_REPLICAS = 1


def build_app(settings: Settings, routing: Literal["affinity", "random"] = "affinity") -> Application:
    replica = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=settings.replicas,
        # The engine queues and refuses (503) by itself; Ray Serve's cap only bounds what one replica holds
        # (and the ingress's channel to it, one more request in flight: server/cluster/channel.py).
        max_ongoing_requests=settings.max_num_seqs + settings.max_queue + INGRESS_REPLICAS,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTERS[routing], request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0),
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=settings.shutdown_grace_seconds, logging_config=_LOGGING)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=INGRESS_REPLICAS, max_ongoing_requests=settings.max_connections, ray_actor_options={"num_cpus": 0},
        logging_config=_LOGGING)
    base_name = settings.served_model_name or Path(settings.model).resolve().name
    # Above every route's own limit (an upload's carries its multipart framing); each replica applies those.
    max_body = int(settings.max_upload_size) + int(settings.max_request_body)
    return ingress.bind(replica.bind(settings), base_name, max_body)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run` / `serve deploy`: Settings from the environment, `args` (the config's `args:`)
    overriding them by field name, e.g. `replicas: 4`."""
    return build_app(Settings(**args))
