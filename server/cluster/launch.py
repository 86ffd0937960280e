"""`loraserve cluster`: a local Ray instance (or the cluster named by RAY_ADDRESS), Ray Serve's HTTP
proxy on --host/--port, and the application of server/cluster/deployment.py, until Ctrl-C."""

import logging
import math
import os
import threading

from server.config import Settings

log = logging.getLogger(__name__)

_OBJECT_STORE_MIN = 256 * 1024**2  # an upload travels to its replica through Ray's object store

# Ray Serve's data plane tuned for throughput (three of the settings its RAY_SERVE_THROUGHPUT_OPTIMIZED mode
# turns on; not its direct ingress, which needs HAProxy): requests and streamed pieces go between proxy, ingress and
# replicas over gRPC instead of Ray actor tasks, and user code and routers run on each replica's main event
# loop. Measured on 2 cores, 1 replica: the proxy and ingress took 3.2-3.8 CPU-s per 1,024 streamed events
# with Ray's defaults and ~1.2 with these (docs/scale-out.md). Ray reads them when each process imports
# ray.serve, so they must be in the environment of every Ray process: `init_ray` puts them there for a
# local instance; a Ray cluster sets them on its nodes (deploy/serve.yaml, docker-compose.yml).
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def init_ray(**options) -> None:
    """`ray.init(**options)` with SERVE_ENV (unless set otherwise already) in this process, which the local
    Ray processes it starts inherit, and in the job's runtime environment (the actors it creates)."""
    import ray

    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    runtime_env = options.pop("runtime_env", None) or {}
    env_vars = {**{name: os.environ[name] for name in SERVE_ENV}, **runtime_env.get("env_vars", {})}
    ray.init(runtime_env={**runtime_env, "env_vars": env_vars}, **options)


def start(settings: Settings, routing: str = "affinity") -> None:
    """Start Ray (unless this process is connected already), Serve and the application; returns once
    every replica has loaded the model."""
    import ray
    from ray import serve

    from server.cluster.deployment import APP_NAME, build_app

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            init_ray(address=address)
        else:
            init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(settings.replicas * settings.replica_cpus)),
                     object_store_memory=max(_OBJECT_STORE_MIN, 2 * int(settings.max_upload_size)),
                     include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, routing), name=APP_NAME, route_prefix="/")
    log.info("cluster of %d replica(s) serving on http://%s:%d", settings.replicas, settings.host, settings.port)


def run(settings: Settings) -> int:
    from ray import serve

    try:
        start(settings)
        threading.Event().wait()
    except KeyboardInterrupt:  # Ctrl-C, also while the replicas are still starting
        pass
    finally:
        serve.shutdown()
    return 0
