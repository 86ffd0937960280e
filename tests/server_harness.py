"""A real loraserve HTTP server on a free loopback port: in a background thread of this process
(`RunningServer`), or as `loraserve serve` in a subprocess (`ServerProcess`: its memory is its own)."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

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


@contextmanager
def serve_adapters(model: Path, adapters: dict[str, Path], store: Path, **settings) -> Iterator[RunningServer]:
    """A RunningServer on float32 CPU (32 MiB of KV cache, the base named "base") over `store`, which gets a
    copy of each adapter directory under its name; `settings` override those defaults."""
    for name, source in adapters.items():
        shutil.copytree(source, store / name)
    defaults = dict(dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2, served_model_name="base")
    with RunningServer(Settings(model=model, adapters_dir=store, **(defaults | settings))) as running:
        yield running


def openai_client(url: str) -> openai.OpenAI:
    """The openai SDK on a test server: no key needed, no retries (a refusal must show at once)."""
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


_START_TIMEOUT_S = 300


class ServerProcess:
    """`loraserve serve` (or `command`) started on enter (returns once /ready answers), terminated on exit.
    `settings` become LORASERVE_* environment variables of the subprocess."""

    def __init__(self, base_dir: Path, store: Path, settings: dict[str, object], extra_env: dict[str, str] | None = None,
                 command: str = "serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(extra_env or {}), **{f"LORASERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", command, "--model", str(base_dir), "--adapters-dir", str(store),
             "--port", str(self.port), "--served-model-name", "base"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def rss_bytes(self) -> int:
        """The server's resident memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
