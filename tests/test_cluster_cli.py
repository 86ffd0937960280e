"""`loraserve cluster` takes every setting and serves until Ctrl-C; the one-process commands refuse its own flags;
deploy/serve.yaml builds the application."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import main
from server.config import CLUSTER_ONLY, Settings
from server.settings_cli import flag
from tests.server_harness import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "p"]])
@pytest.mark.parametrize("argv", [["--replicas", "2"], ["--replica-cpus", "0.5"]])
def test_one_process_commands_refuse_cluster_flags_instead_of_ignoring_them(command, argv):
    with pytest.raises(SystemExit) as exit_:
        main([*command, *argv])
    assert f"{argv[0]} apply to `loraserve cluster` only" in str(exit_.value.code)


def test_cluster_offers_every_setting(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    out = capsys.readouterr().out
    assert all(flag(name) in out for name in Settings.model_fields) and CLUSTER_ONLY <= set(Settings.model_fields)


def test_the_ray_serve_config_validates_and_builds_the_application(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.cluster import deployment

    config = ServeDeploySchema(**yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text()))
    [app] = config.applications
    module, _, builder = app.import_path.partition(":")
    assert module == deployment.__name__ and builder == "app_builder"
    from server.cluster.launch import SERVE_ENV

    assert SERVE_ENV.items() <= app.runtime_env["env_vars"].items()  # the replicas' Ray Serve settings
    for name, value in app.runtime_env["env_vars"].items():
        monkeypatch.setenv(name, value)
    built = deployment.app_builder(app.args)
    replicas = built._bound_deployment.init_args[0]._bound_deployment  # the Ingress is bound to the replicas
    assert replicas.num_replicas == app.args["replicas"]
    settings = replicas.init_args[0]
    assert settings.catalogue_url.startswith("postgresql+psycopg://") and settings.shared_limits


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_loraserve_cluster_serves_until_ctrl_c(llama_dir, tmp_path, stop):
    """The command itself, as a user runs it: a local Ray instance, 1 replica, the API on --port; Ctrl-C or
    SIGTERM (`docker stop`) shuts the front, Serve and Ray down and exits 0."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "cluster", "--replicas", "1", "--replica-cpus", "0.5",
               "--model", str(llama_dir), "--adapters-dir", str(tmp_path), "--served-model-name", "base",
               "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "32MiB", "--torch-threads", "1",
               "--no-cpu-kernel", "--max-upload-size", "16MiB", "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                            json={"model": "base", "prompt": "Hi", "max_tokens": 3})
        assert answer.status_code == 200 and answer.headers["x-replica"]
        assert answer.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(stop)
        assert process.wait(timeout=120) == 0
