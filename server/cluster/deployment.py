"""The Ray Serve application: `replicas` x `EngineReplica`, routed by `server/cluster/router.py`, with an
`Ingress` deployment in front for Ray Serve's HTTP proxy (`app_builder`, for a Ray Serve config file:
deploy/serve.yaml, whose replicas read their settings from LORASERVE_* variables), or without one for
`loraserve cluster`, whose own process is the HTTP front (server/cluster/front.py)."""

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
REPLICA_DEPLOYMENT = "EngineReplica"
# Replicas report their resident adapters this often; the router also remembers its own decisions.
ROUTING_STATS_PERIOD_S = 0.5
# The app logs each request itself (with its request id); Ray Serve's own line per call would double that.
_LOGGING = LoggingConfig(enable_access_log=False)
INGRESS_REPLICAS = 1
# Each holds one channel per replica (server/cluster/channel.py): the Ingress deployment's replicas, and the
# front of a `loraserve cluster` process (server/cluster/front.py).
CHANNELS_PER_REPLICA = INGRESS_REPLICAS + 1


class IngressDeployment(Ingress):
    """The Ingress as a Ray Serve deployment, behind Serve's HTTP proxy."""

    async def __del__(self):  # Ray Serve calls it once this replica of the ingress has drained
        await self.close()


def build_app(settings: Settings, routing: Literal["affinity", "random"] = "affinity", *,
              with_ingress: bool = True) -> Application:
    replica = serve.deployment(EngineReplica, name=REPLICA_DEPLOYMENT).options(
        num_replicas=settings.replicas,
        # The engine queues and refuses (503) by itself; Ray Serve's cap only bounds what one replica holds
        # and the channels of the ingresses to it, each one more request in flight.
        max_ongoing_requests=settings.max_num_seqs + settings.max_queue + CHANNELS_PER_REPLICA,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTERS[routing], request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0),
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=settings.shutdown_grace_seconds, logging_config=_LOGGING).bind(settings)
    if not with_ingress:
        return replica
    ingress = serve.deployment(IngressDeployment, name="Ingress").options(
        num_replicas=INGRESS_REPLICAS, max_ongoing_requests=settings.max_connections, ray_actor_options={"num_cpus": 0},
        logging_config=_LOGGING)
    return ingress.bind(replica, settings)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run` / `serve deploy`: Settings from the environment, `args` (the config's `args:`)
    overriding them by field name, e.g. `replicas: 4`."""
    return build_app(Settings(**args))
