"""A real loraserve HTTP server (uvicorn) on a free loopback port, in a background thread."""

import socket
import threading
import time

import uvicorn

from server.api.app import create_app
from server.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, settings: Settings):
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port, log_config=None,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def state(self):
        return self.app.state.loraserve

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
