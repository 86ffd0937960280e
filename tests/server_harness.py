"""A real loraserve HTTP server (uvicorn) on a free loopback port, in a background thread."""

import socket
import threading
import time

from server.api.app import create_app
from server.api.http_server import build_server
from server.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """The server `loraserve serve` runs (server/api/http_server.py), with a shutdown grace of 5 s at most."""

    def __init__(self, settings: Settings):
        self.settings = settings.model_copy(update={
            "host": "127.0.0.1", "port": free_port(),
            "shutdown_grace_seconds": min(settings.shutdown_grace_seconds, 5.0)})
        self.app = create_app(self.settings)
        self._server = build_server(self.app, self.settings)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def state(self):
        return self.app.state.loraserve

    @property
    def open_connections(self) -> int:
        """HTTP connections the server holds open now."""
        return len(self._server.server_state.connections)

    def __enter__(self) -> "RunningServer":
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
