"""The `loraserve` command line: one flag per setting, generated from `Settings`, and README's table of them."""

import json
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from server.cli import build_parser, main
from server.config import Settings
from server.settings_cli import env_var, render_default, settings_from_args

README = Path(__file__).resolve().parents[1] / "README.md"

# Each setting: its flag spelled out (the spelling is a contract), a value unlike the default, and what
# Settings then holds.
FLAGS: dict[str, tuple[list[str], object]] = {
    "model": (["--model", "/m"], Path("/m")),
    "served_model_name": (["--served-model-name", "base"], "base"),
    "dtype": (["--dtype", "float16"], "float16"),
    "device": (["--device", "cpu"], "cpu"),
    "quantization": (["--quantization", "bnb-nf4"], "bnb-nf4"),
    "max_loras": (["--max-loras", "8"], 8),
    "max_lora_rank": (["--max-lora-rank", "16"], 16),
    "slot_copy_memory": (["--slot-copy-memory", "1MiB"], 1024**2),
    "max_num_seqs": (["--max-num-seqs", "4"], 4),
    "torch_threads": (["--torch-threads", "2"], 2),
    "cpu_kernel": (["--no-cpu-kernel"], False),
    "max_batch_tokens": (["--max-batch-tokens", "512"], 512),
    "max_queue": (["--max-queue", "0"], 0),
    "kv_cache_memory": (["--kv-cache-memory", "2GB"], 2 * 10**9),
    "kv_block_size": (["--kv-block-size", "32"], 32),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "merged_budget": (["--merged-budget", "0"], 0),
    "merge_promote_share": (["--merge-promote-share", "0.75"], 0.75),
    "merge_demote_share": (["--merge-demote-share", "0.1"], 0.1),
    "merge_half_life_tokens": (["--merge-half-life-tokens", "100"], 100),
    "adapters_dir": (["--adapters-dir", "/a"], Path("/a")),
    "catalogue_url": (["--catalogue-url", "sqlite:///c.db"], "sqlite:///c.db"),
    "host_cache_memory": (["--host-cache-memory", "1KiB"], 1024),
    "max_upload_size": (["--max-upload-size", "1MB"], 10**6),
    "max_request_body": (["--max-request-body", "4096"], 4096),
    "lora": (["--lora", "a=/x", "--lora", "b=/y"], ["a=/x", "b=/y"]),
    "auth": (["--auth", "off"], "off"),
    "admin_key": (["--admin-key", "s3cret"], SecretStr("s3cret")),
    "tenant_requests_per_minute": (["--tenant-requests-per-minute", "0"], 0),
    "tenant_tokens_per_minute": (["--tenant-tokens-per-minute", "1000"], 1000),
    "tenant_max_concurrent": (["--tenant-max-concurrent", "2"], 2),
    "tenant_max_adapters": (["--tenant-max-adapters", "3"], 3),
    "tenant_max_adapter_bytes": (["--tenant-max-adapter-bytes", "1GB"], 10**9),
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "9000"], 9000),
    "log_format": (["--log-format", "text"], "text"),
    "shutdown_grace_seconds": (["--shutdown-grace-seconds", "1.5"], 1.5),
    "max_connections": (["--max-connections", "64"], 64),
    "max_connections_per_client": (["--max-connections-per-client", "0"], 0),
    "max_header_bytes": (["--max-header-bytes", "16KiB"], 16 * 1024),
    "max_header_fields": (["--max-header-fields", "50"], 50),
    "request_head_timeout": (["--request-head-timeout", "2.5"], 2.5),
    "keep_alive_timeout": (["--keep-alive-timeout", "0.5"], 0.5),
    "replicas": (["--replicas", "3"], 3),
    "replica_cpus": (["--replica-cpus", "0.5"], 0.5),
    "stream_interval": (["--stream-interval", "0"], 0.0),
    "shared_limits": (["--shared-limits"], True),
}


def _settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(list(argv)))


@pytest.fixture(autouse=True)
def _no_settings_in_the_environment(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_var(name), raising=False)


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "p"]])
def test_every_setting_has_a_flag_that_reaches_settings(command):
    assert set(FLAGS) == set(Settings.model_fields)
    settings = _settings(*command, *[arg for argv, _ in FLAGS.values() for arg in argv])
    for name, (_, expected) in FLAGS.items():
        assert getattr(settings, name) == expected, name
        assert expected != Settings.model_fields[name].get_default(call_default_factory=True), name


def test_flags_not_given_leave_the_defaults():
    assert _settings("serve") == Settings()


def test_environment_variable_applies_unless_the_flag_is_given(monkeypatch):
    monkeypatch.setenv("LORASERVE_MERGED_BUDGET", "1GB")
    monkeypatch.setenv("LORASERVE_CPU_KERNEL", "false")
    from_env = _settings("serve")
    assert from_env.merged_budget == 10**9 and from_env.cpu_kernel is False
    from_flags = _settings("serve", "--merged-budget", "0", "--cpu-kernel")
    assert from_flags.merged_budget == 0 and from_flags.cpu_kernel is True


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_shows_each_settings_description_default_and_variable(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: descriptions are not wrapped
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert f"{field.description} Default: {render_default(name)}. Env: {env_var(name)}." in out, name


BAD_VALUES = [
    (["--lora", "no-equals-sign"], "argument --lora: expected NAME=PATH, got 'no-equals-sign'"),
    (["--lora", "=/path"], "argument --lora: expected NAME=PATH"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
    (["--max-loras", "0"], "argument --max-loras: Input should be greater than or equal to 1, got '0'"),
    (["--kv-cache-memory", "2XB"], "argument --kv-cache-memory: could not interpret byte unit"),
    (["--merged-budget"], "argument --merged-budget: expected one argument"),
]


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "p"]])
def test_bad_values_exit_2_naming_the_flag(command, capsys):
    for argv, message in BAD_VALUES:
        with pytest.raises(SystemExit) as exit_:
            main([*command, *argv])
        assert exit_.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_keys_takes_the_store_settings_from_the_generator(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        main(["keys", "--help"])
    help_text = capsys.readouterr().out
    assert env_var("adapters_dir") in help_text and env_var("catalogue_url") in help_text

    assert main(["keys", "--adapters-dir", str(tmp_path), "create", "--role", "admin"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["role"] == "admin" and created["key"].startswith("lsk_")
    assert (tmp_path / ".loraserve" / "catalogue.db").is_file()


def _readme_flag_rows() -> list[tuple[str, str]]:
    """(flag, default) for each flag in the `| flag | meaning | default |` table of README."""
    rows = []
    for line in README.read_text().splitlines():
        if line.startswith("| `--"):
            first, *_, default = (cell.strip() for cell in line.strip("|").split(" | "))
            rows += [(flag, default.strip("`")) for flag in re.findall(r"--[a-z][a-z-]*", first)]
    return rows


def _field(flag: str) -> str:
    return flag.removeprefix("--").removeprefix("no-").replace("-", "_")


def test_readme_table_lists_every_setting():
    assert {_field(flag) for flag, _ in _readme_flag_rows()} == set(Settings.model_fields)


def test_readme_flags_are_accepted_by_serve_with_the_settings_defaults():
    for flag, default in _readme_flag_rows():
        name = _field(flag)
        assert name in Settings.model_fields, flag
        assert default == render_default(name), flag
        argv, expected = FLAGS[name]
        if flag not in argv:  # --cpu-kernel, the other half of --no-cpu-kernel
            argv, expected = [flag], True
        assert getattr(_settings("serve", *argv), name) == expected, flag
        if default not in ("unset", "none", "on", "off"):  # README's default, given as the flag, is the default
            assert getattr(_settings("serve", flag, default), name) == getattr(Settings(), name), flag
