"""`loraserve cluster`'s HTTP endpoint: the Ingress (server/cluster/ingress.py) served by uvicorn in the
`loraserve cluster` process itself, with `loraserve serve`'s connection limits (server/api/http_server.py),
calling the replicas through a DeploymentHandle whose request router (server/cluster/router.py) runs here.
The application must be deployed first (server/cluster/launch.py `deploy`).

Ray Serve's own HTTP proxy would put one more Ray hop in front of an Ingress replica, paid per streamed event
(deploy/serve.yaml's way, for Ray clusters whose entry point is Serve's proxy): measured on 2 cores with 1
replica, the proxy and an Ingress replica took ~0.54 CPU-s per 1,024 streamed events, this front 0.13-0.18
(docs/scale-out.md)."""

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.http_server import build_server
from server.cluster.ingress import Ingress
from server.config import Settings

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_START_TIMEOUT_S = 30.0


class Front:
    """The HTTP server of `loraserve cluster`: `run()` in the main thread (until Ctrl-C or SIGTERM), or
    `start()` in a thread of its own and `stop()` (tests, benchmarks)."""

    def __init__(self, settings: Settings, then: Callable[[], Awaitable[None]] | None = None):
        """`then`: awaited on the front's event loop once it has stopped serving (`loraserve cluster` shuts
        Serve down there: Serve's clients in this process are bound to that loop and would report its end)."""
        # Imported here: ray.serve reads SERVE_ENV once, when first imported (server/cluster/launch.py).
        from ray.serve.handle import DeploymentHandle

        from server.cluster.deployment import APP_NAME, REPLICA_DEPLOYMENT

        # A handle of its own, not Serve's cached one: its router runs on this front's event loop (from the
        # first request) and is shut down with it, so Serve can be shut down or redeployed after.
        replicas = DeploymentHandle(REPLICA_DEPLOYMENT, APP_NAME)
        self.ingress = Ingress(replicas, settings)
        self.url = f"http://{settings.host}:{settings.port}"

        async def forward(request: Request) -> Response:
            return await self.ingress(request)

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            yield
            await self.ingress.close()
            await replicas.shutdown_async()
            if then is not None:
                await then()

        app = Starlette(routes=[Route("/{path:path}", forward, methods=_METHODS)], lifespan=lifespan)
        self._server = build_server(app, settings)
        self._thread: threading.Thread | None = None

    def run(self) -> bool:
        """Serve until Ctrl-C or SIGTERM; False if the server could not start (its port taken)."""
        try:
            self._server.run()
        except KeyboardInterrupt:  # uvicorn raises the captured Ctrl-C again once it has shut down
            pass
        return self._server.started

    def start(self) -> "Front":
        self._thread = threading.Thread(target=self._server.run, name="loraserve-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._server.started:
            raise RuntimeError(f"the cluster's HTTP front did not start on {self.url}")
        return self

    def stop(self) -> None:
        """Stop serving once the answers in flight end (within `--shutdown-grace-seconds`)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
