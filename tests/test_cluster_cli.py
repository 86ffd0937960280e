"""`loraserve cluster` takes every setting; the commands of one process refuse the cluster's own."""

from pathlib import Path

import pytest

from server.cli import main
from server.config import CLUSTER_ONLY, Settings
from server.settings_cli import flag

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
    for name, value in app.runtime_env["env_vars"].items():
        monkeypatch.setenv(name, value)
    built = deployment.app_builder(app.args)
    replicas = built._bound_deployment.init_args[0]._bound_deployment  # the Ingress is bound to the replicas
    assert replicas.num_replicas == app.args["replicas"]
    settings = replicas.init_args[0]
    assert settings.catalogue_url.startswith("postgresql+psycopg://") and settings.shared_limits
