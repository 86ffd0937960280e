"""`loraserve serve` in a subprocess on a free loopback port, for benchmarks that go through HTTP."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server_harness import free_port

_START_TIMEOUT_S = 300


class ServerProcess:
    """Started on enter (returns once /ready answers), terminated on exit. `settings` become
    LORASERVE_* environment variables of the subprocess."""

    def __init__(self, base_dir: Path, store: Path, settings: dict[str, object], extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(extra_env or {}), **{f"LORASERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(base_dir), "--adapters-dir", str(store),
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
