"""AdapterRegistry end to end on real SQLite files and real PEFT safetensors adapters (no fakes)."""

import hashlib
import os
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.errors import AdapterValidationError
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.lora.targets import find_target_modules
from server.registry.errors import (
    AdapterNotFoundError, InvalidNameError, NameConflictError, PathNotAllowedError, UploadTooLargeError,
)
from server.db import STATE_DIR, open_database
from server.registry.catalogue import Catalogue
from server.registry.namespace import Namespace
from server.registry.registry import AdapterRegistry, validator_for


@pytest.fixture(scope="module")
def targets(llama_dir):
    return find_target_modules(AutoModelForCausalLM.from_pretrained(llama_dir))


@pytest.fixture(scope="module")
def validator(targets):
    return validator_for(targets, max_rank=64, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter_a(llama_adapters) -> Path:
    return llama_adapters("registry_a", seed=31, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def adapter_b(llama_adapters) -> Path:
    return llama_adapters("registry_b", seed=32, r=4, lora_alpha=8, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "down_proj"])


@pytest.fixture
def adapters_dir(tmp_path) -> Path:
    directory = tmp_path / "adapters"
    directory.mkdir()
    return directory


@pytest.fixture
def open_registry(adapters_dir):
    """Opens registries on adapters_dir's catalogue (each with its own database), all closed at the end."""
    databases = []

    def open_(validator, **options) -> AdapterRegistry:
        database = open_database(adapters_dir)
        databases.append(database)
        return AdapterRegistry(adapters_dir, validator, Catalogue(database, Namespace(database)), **options)

    yield open_
    for database in databases:
        database.close()


@pytest.fixture
def registry(open_registry, validator):
    return open_registry(validator)


def _files(directory: Path) -> tuple[bytes, bytes]:
    return (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()


def _upload(registry: AdapterRegistry, name: str, directory: Path, description: str = ""):
    config, weights = _files(directory)
    return registry.upload(name, description, config, weights)


def _state(adapters_dir: Path) -> tuple[list[str], ...]:
    state = adapters_dir / STATE_DIR
    return tuple(sorted(p.name for p in (state / sub).iterdir()) for sub in ("blobs", "tmp"))


def test_upload_records_metadata_computed_from_the_validated_adapter(registry, adapter_a, targets):
    config, weights = _files(adapter_a)
    record = registry.upload("bot", "first try", config, weights)
    assert (record.name, record.version, record.key, record.source) == ("bot", 1, "bot@1", "upload")
    assert record.description == "first try"
    assert record.weights_sha256 == hashlib.sha256(weights).hexdigest()
    digests = hashlib.sha256(config).digest() + hashlib.sha256(weights).digest()
    assert record.blob_key == hashlib.sha256(digests).hexdigest()
    assert (record.rank, record.alpha, record.use_dora, record.use_rslora) == (8, 16.0, False, False)
    assert record.target_modules == ("q_proj", "v_proj")
    adapted = [t for name, t in targets.items() if name.endswith(("q_proj", "v_proj"))]
    assert record.trainable_params == sum(8 * (t.in_features + t.out_features) for t in adapted)
    assert record.adapted_base_params == sum(t.in_features * t.out_features for t in adapted)
    assert record.size_bytes == len(config) + len(weights)
    # Validated once at upload and kept in host memory under the key the engine uses.
    assert registry.tier_of("bot@1") == "host"
    assert registry.load(record).name == "bot@1"


def test_lifecycle_upload_version_alias_resolve_delete(registry, adapter_a, adapter_b):
    first = _upload(registry, "bot", adapter_a)
    second = _upload(registry, "bot", adapter_b)
    assert second.version == 2 and second.use_rslora
    assert second.target_modules == ("down_proj", "k_proj", "q_proj")
    assert [r.version for r in registry.get("bot")] == [1, 2]
    assert registry.resolve("bot") == second and registry.resolve("bot@1") == first

    registry.set_alias("stable", "bot@1")
    assert registry.resolve("stable") == first
    assert registry.get_alias("stable").target == "bot@1"
    with pytest.raises(NameConflictError):
        _upload(registry, "stable", adapter_a)
    with pytest.raises(NameConflictError):
        registry.set_alias("bot", "bot@2")

    assert [r.key for r in registry.delete("bot", 2)] == ["bot@2"]
    assert registry.tier_of("bot@2") == "disk" and "bot@2" not in registry.cache  # dropped from host memory
    assert registry.resolve("bot") == first
    third = _upload(registry, "bot", adapter_b)
    assert third.version == 3  # 2 is never reused
    registry.delete("bot")
    for model in ("bot", "bot@1", "bot@3", "stable"):
        with pytest.raises(AdapterNotFoundError):
            registry.resolve(model)
    with pytest.raises(AdapterNotFoundError):
        registry.get("bot")
    assert registry.list().total == 0
    assert registry.delete_alias("stable").alias == "stable" and registry.list_aliases() == []


def test_identical_uploads_share_one_blob(registry, adapters_dir, adapter_a):
    one, two = _upload(registry, "one", adapter_a), _upload(registry, "two", adapter_a)
    assert one.blob_key == two.blob_key
    assert _state(adapters_dir) == ([one.blob_key], [])


def test_validation_failure_stores_nothing(registry, adapters_dir, adapter_a):
    config, weights = _files(adapter_a)
    bad_config = json.dumps(json.loads(config) | {"r": 4}).encode()  # weights are rank 8
    with pytest.raises(AdapterValidationError, match="shape"):
        registry.upload("bot", "", bad_config, weights)
    with pytest.raises(AdapterValidationError, match="not a valid safetensors"):
        registry.upload("bot", "", config, b"not safetensors")
    assert _state(adapters_dir) == ([], [])
    assert registry.catalogue.latest("bot", include_deleted=True) is None
    assert registry.cache.keys() == []


def test_name_and_size_refusals_store_nothing(open_registry, adapters_dir, validator, adapter_a):
    config, weights = _files(adapter_a)
    registry = open_registry(validator, max_upload_bytes=len(config) + len(weights) - 1)
    for name in ("../bot", "a/b", ".bot", "bot@2", ""):
        with pytest.raises(InvalidNameError):
            registry.upload(name, "", config, weights)
    chunks_read = []

    def stream():
        for start in range(0, len(weights), 1024):
            chunks_read.append(start)
            yield weights[start:start + 1024]

    with pytest.raises(UploadTooLargeError):
        registry.upload("bot", "", config, stream())
    assert len(chunks_read) == -(-len(weights) // 1024)  # the limit tripped on the very last chunk
    assert _state(adapters_dir) == ([], [])
    assert registry.catalogue.latest("bot", include_deleted=True) is None


def test_restart_keeps_everything_and_cleans_crash_leftovers(open_registry, adapters_dir, validator, adapter_a, adapter_b):
    first = open_registry(validator)
    record = _upload(first, "bot", adapter_a)
    first.set_alias("prod", "bot@1")
    first.blobs.stage(*_files(adapter_b), max_bytes=10**9)  # a crash mid-upload: staged, never committed
    (adapters_dir / STATE_DIR / "tmp" / "torn-write").write_bytes(b"\x00" * 10)
    assert len(_state(adapters_dir)[1]) == 2
    hours_ago = time.time() - 7200  # younger temporaries may be uploads of a replica sharing the store
    for entry in (adapters_dir / STATE_DIR / "tmp").iterdir():
        os.utime(entry, (hours_ago, hours_ago))

    again = open_registry(validator)
    assert _state(adapters_dir) == ([record.blob_key], [])  # temporaries gone, the blob kept
    assert again.resolve("prod") == record
    assert again.tier_of("bot@1") == "disk"  # host memory does not survive a restart
    loaded = again.load(record)
    assert loaded.name == "bot@1" and again.tier_of("bot@1") == "host"
    expected = validator(adapter_a, name="x")
    for module, weights in expected.modules.items():
        assert torch.equal(loaded.modules[module].lora_b, weights.lora_b)
    assert again.cache.stats().loads == 1
    assert _upload(again, "bot", adapter_b).version == 2


def test_discovery_registers_valid_dirs_and_skips_the_rest(registry, adapters_dir, adapter_a, adapter_b):
    shutil.copytree(adapter_a, adapters_dir / "alpha")
    shutil.copytree(adapter_b, adapters_dir / "beta")
    broken = shutil.copytree(adapter_a, adapters_dir / "broken")
    (broken / CONFIG_FILE).write_text("{not json")
    pickled = shutil.copytree(adapter_a, adapters_dir / "pickled")
    (pickled / WEIGHTS_FILE).rename(pickled / "adapter_model.bin")
    shutil.copytree(adapter_a, adapters_dir / "bad name")
    shutil.copytree(adapter_a, adapters_dir / ".hidden")
    (adapters_dir / "notes").mkdir()

    report = registry.discover()
    assert [r.key for r in report.registered] == ["alpha@1", "beta@1"]
    assert all(r.source == "disk" for r in report.registered)
    assert sorted(report.skipped) == ["bad name", "broken", "pickled"]
    assert "not valid JSON" in report.skipped["broken"]
    assert "adapter_model.safetensors" in report.skipped["pickled"]
    assert "invalid adapter name" in report.skipped["bad name"]

    again = registry.discover()
    assert again.registered == () and [r.key for r in again.unchanged] == ["alpha@1", "beta@1"]

    shutil.copy(adapter_b / WEIGHTS_FILE, adapters_dir / "alpha" / WEIGHTS_FILE)  # changed content
    shutil.copy(adapter_b / CONFIG_FILE, adapters_dir / "alpha" / CONFIG_FILE)
    assert [r.key for r in registry.discover().registered] == ["alpha@2"]

    registry.delete("beta")
    after_delete = registry.discover()
    assert "deleted through the API" in after_delete.skipped["beta"]
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("beta")


def test_register_directory_is_idempotent(registry, adapter_a, adapter_b):
    first = registry.register_directory("cli-bot", adapter_a, source="cli")
    repeat = registry.register_directory("cli-bot", adapter_a, source="cli")
    assert first.created and not repeat.created and repeat.record == first.record
    assert first.record.source == "cli"
    assert registry.register_directory("cli-bot", adapter_b, source="cli").record.version == 2
    # The newest version differs from adapter_a again, so it is a new version, not a no-op.
    assert registry.register_directory("cli-bot", adapter_a, source="cli").record.version == 3


def test_load_from_path_stays_inside_the_adapters_dir(registry, adapters_dir, adapter_a, tmp_path):
    shutil.copytree(adapter_a, adapters_dir / "inside")
    outside = shutil.copytree(adapter_a, tmp_path / "outside")
    assert registry.load_from_path("in", "inside").key == "in@1"
    assert registry.load_from_path("in2", adapters_dir / "inside").key == "in2@1"  # absolute, but inside

    (adapters_dir / "link").symlink_to(outside, target_is_directory=True)
    sneaky = (adapters_dir / "sneaky")
    sneaky.mkdir()
    shutil.copy(adapter_a / CONFIG_FILE, sneaky / CONFIG_FILE)
    (sneaky / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    for path in ("../outside", str(outside), "link", "sneaky", "inside/../../outside", "/etc", ".", ""):
        with pytest.raises(PathNotAllowedError):
            registry.load_from_path("x", path)
    assert registry.catalogue.latest("x", include_deleted=True) is None


def test_concurrent_loads_of_one_key_do_the_work_once(open_registry, adapters_dir, validator, adapter_a):
    calls = []

    def slow_validator(directory: Path, name: str):
        calls.append(name)
        time.sleep(0.2)  # long enough for every thread to arrive while the first load runs
        return validator(directory, name=name)

    uploader = open_registry(validator)
    record = _upload(uploader, "bot", adapter_a)
    registry = open_registry(slow_validator)  # fresh: the host cache is empty
    barrier = threading.Barrier(6)
    results = []

    def load():
        barrier.wait()
        results.append(registry.load(record))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["bot@1"]  # validated once, with the key as its name
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert registry.cache.stats().loads == 1
    assert registry.load(record) is results[0] and calls == ["bot@1"]  # later: a plain cache hit


def test_a_failed_load_reaches_every_waiter_and_is_retried_later(open_registry, adapters_dir, validator, adapter_a):
    other_base = validator_for({}, max_rank=64, dtype=torch.float32)  # a base without these modules
    calls = []

    def failing_validator(directory: Path, name: str):
        calls.append(name)
        time.sleep(0.2)
        return other_base(directory, name=name)

    uploader = open_registry(validator)
    record = _upload(uploader, "bot", adapter_a)
    registry = open_registry(failing_validator)
    barrier = threading.Barrier(4)
    errors = []

    def load():
        barrier.wait()
        try:
            registry.load(record)
        except AdapterValidationError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(errors) == 4 and "no linear module" in str(errors[0])
    with pytest.raises(AdapterValidationError):
        registry.load(record)
    assert len(calls) == 2  # failures are not cached: the next load tries again
    assert registry.tier_of("bot@1") == "disk"


def test_list_pages_and_host_cache_budget(open_registry, adapters_dir, validator, adapter_a, adapter_b):
    size_a = validator(adapter_a, name="x").nbytes
    registry = open_registry(validator, host_cache_bytes=size_a)
    _upload(registry, "a", adapter_a)
    _upload(registry, "b", adapter_b)
    _upload(registry, "c", adapter_a)
    assert registry.cache.stats().used_bytes <= size_a
    assert registry.tier_of("c@1") == "host" and registry.tier_of("a@1") == "disk"
    page = registry.list(limit=2, offset=1)
    assert page.total == 3 and [s.name for s in page.items] == ["b", "c"]


# ---- blobs are garbage once no live version uses them ----------------------------------------------

def test_upload_delete_cycles_leave_the_disk_as_it_was(registry, adapter_a, adapter_b):
    _upload(registry, "keeper", adapter_b)
    baseline = registry.blobs.size_bytes()
    for cycle in range(5):
        record = _upload(registry, "churn", adapter_a)
        assert registry.blobs.size_bytes() > baseline
        registry.delete("churn", record.version)
        assert registry.blobs.size_bytes() == baseline, f"cycle {cycle} left its blob behind"
    assert set(registry.blobs.keys()) == {registry.resolve("keeper").blob_key}


def test_a_blob_another_live_version_uses_stays(registry, adapter_a):
    first = _upload(registry, "one", adapter_a)
    second = _upload(registry, "two", adapter_a)
    assert first.blob_key == second.blob_key
    registry.delete("one")
    assert registry.blobs.exists(second.blob_key)
    assert registry.load(registry.resolve("two")) is not None
    registry.delete("two")
    assert not registry.blobs.exists(second.blob_key)


def test_a_refused_catalogue_row_takes_its_blob_back(registry, adapter_a, monkeypatch):
    def refuse(*args, **kwargs):
        raise NameConflictError("refused after the blob was committed")

    monkeypatch.setattr(registry.catalogue, "add_version", refuse)  # fault injection: the row insert fails
    with pytest.raises(NameConflictError):
        _upload(registry, "orphan", adapter_a)
    assert registry.blobs.keys() == {}


def test_unused_blobs_older_than_an_hour_are_swept_at_start(open_registry, validator, adapter_a, adapter_b):
    import os

    registry = open_registry(validator)
    old = _upload(registry, "old", adapter_a)
    young = _upload(registry, "young", adapter_b)
    with registry.catalogue._db.engine.begin() as connection:  # rows gone, blobs left: as after a crash
        connection.exec_driver_sql("DELETE FROM adapter_versions")
    hours_ago = time.time() - 7200
    os.utime(registry.blobs.path(old.blob_key), (hours_ago, hours_ago))
    reopened = open_registry(validator)
    assert set(reopened.blobs.keys()) == {young.blob_key}, "an unused blob an hour old goes; a young one stays"
