"""`loraserve cluster`: a local Ray instance (or the cluster named by RAY_ADDRESS), the replicas of
server/cluster/deployment.py on Ray Serve, and this process's HTTP front on --host/--port
(server/cluster/front.py), until Ctrl-C."""

import logging
import math
import os
import signal

from server.cluster.front import Front
from server.config import Settings

log = logging.getLogger(__name__)

_OBJECT_STORE_MIN = 256 * 1024**2  # an upload travels to its replica through Ray's object store

# Ray Serve's data plane tuned for throughput (three of the settings its RAY_SERVE_THROUGHPUT_OPTIMIZED mode
# turns on; not its direct ingress, which needs HAProxy): requests and streamed pieces go between the ingress and
# replicas (and Serve's proxy, under deploy/serve.yaml) over gRPC instead of Ray actor tasks, and user code and
# routers run on each process's main event loop. Measured on 2 cores, 1 replica, behind Serve's proxy: the proxy
# and ingress took 3.2-3.8 CPU-s per 1,024 streamed events with Ray's defaults and ~1.2 with these
# (docs/scale-out.md). Ray reads them when each process imports
# ray.serve, so they must be in the environment of every Ray process: `init_ray` puts them there for a
# local instance; a Ray cluster sets them on its nodes (deploy/serve.yaml, docker-compose.yml).
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def init_ray(**options) -> None:
    """`ray.init(**options)` with SERVE_ENV (unless set otherwise already) in this process (whose front routes
    requests: call it before importing ray.serve), which the local Ray processes it starts inherit, and in the
    job's runtime environment (the actors it creates)."""
    import ray

    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    runtime_env = options.pop("runtime_env", None) or {}
    env_vars = {**{name: os.environ[name] for name in SERVE_ENV}, **runtime_env.get("env_vars", {})}
    ray.init(runtime_env={**runtime_env, "env_vars": env_vars}, **options)


def deploy(settings: Settings, routing: str = "affinity", *, serve_proxy: bool = False) -> None:
    """Start Ray (unless this process is connected already), Serve and the application; returns once every
    replica has loaded the model. `serve_proxy`: Ray Serve's HTTP proxy on --host/--port in front of an
    Ingress deployment, as deploy/serve.yaml runs it; otherwise no proxy (a `Front` serves)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            init_ray(address=address)
        else:
            init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(settings.replicas * settings.replica_cpus)),
                     object_store_memory=max(_OBJECT_STORE_MIN, 2 * int(settings.max_upload_size)),
                     include_dashboard=False)
    from ray import serve  # only now: it reads SERVE_ENV when imported

    from server.cluster.deployment import APP_NAME, build_app

    if serve_proxy:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, routing), name=APP_NAME, route_prefix="/")
    else:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings, routing, with_ingress=False), name=APP_NAME, route_prefix=None)


def start(settings: Settings, routing: str = "affinity") -> Front:
    """The cluster with its HTTP front serving from a thread of this process (tests, benchmarks)."""
    deploy(settings, routing)
    return Front(settings).start()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(settings: Settings) -> int:
    try:
        deploy(settings)
    except KeyboardInterrupt:  # Ctrl-C while the replicas are still starting
        from ray import serve

        serve.shutdown()
        return 0
    from ray import serve

    # SIGTERM (`docker stop`, Kubernetes) ends it as Ctrl-C does: the front drains, then Serve shuts down and
    # frees the replicas' resources. Set after ray.init, whose own handler would exit at once. (uvicorn takes
    # both signals while it serves, then raises them again.)
    signal.signal(signal.SIGTERM, _interrupt)
    front = Front(settings, then=serve.shutdown_async)
    log.info("cluster of %d replica(s) serving on %s", settings.replicas, front.url)
    return 0 if front.run() else 3  # uvicorn's status for a server that failed to start
