"""`loraserve cluster` takes every setting; the commands of one process refuse the cluster's own."""

import pytest

from server.cli import main
from server.config import CLUSTER_ONLY, Settings
from server.settings_cli import flag


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
