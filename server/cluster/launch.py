"""`loraserve cluster`: a local Ray instance (or the cluster named by RAY_ADDRESS), Ray Serve's HTTP
proxy on --host/--port, and the application of server/cluster/deployment.py, until Ctrl-C."""

import logging
import math
import os
import threading

from server.config import Settings

log = logging.getLogger(__name__)

_OBJECT_STORE_MIN = 256 * 1024**2  # an upload travels to its replica through Ray's object store


def start(settings: Settings, routing: str = "affinity") -> None:
    """Start Ray (unless this process is connected already), Serve and the application; returns once
    every replica has loaded the model."""
    import ray
    from ray import serve

    from server.cluster.deployment import APP_NAME, build_app

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(settings.replicas * settings.replica_cpus)),
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
