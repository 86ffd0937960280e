"""One namespace of `model` strings (adapter names, aliases, experiment names) with one claim: in the
stores on a real SQLite file and a real PostgreSQL, and over HTTP with auth off, where every caller is an admin and release
0.1.0 let an adapter or an alias take a running experiment's name (which then hid it)."""

import shutil
from datetime import UTC, datetime

import httpx
import pytest

from server.config import Settings
from server.db import Database
from server.experiments.errors import ExperimentNameConflictError
from server.experiments.model import Experiment, Status, Variant
from server.experiments.store import ExperimentStore
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.registry.catalogue import Catalogue
from server.registry.errors import AdapterNotFoundError, NameConflictError
from server.registry.namespace import Name, Namespace
from server.registry.records import AdapterMetadata
from tests.postgres_server import postgres  # noqa: F401  (a fixture)
from tests.server_harness import RunningServer

METADATA = AdapterMetadata(blob_key="a" * 64, weights_sha256="b" * 64, description="", rank=4, alpha=8.0,
                           target_modules=("q_proj",), use_dora=False, use_rslora=False, trainable_params=1,
                           adapted_base_params=2, size_bytes=3, source="upload")


def _experiment(name: str) -> Experiment:
    now = datetime.now(UTC)
    return Experiment(name, "", Status.RUNNING, (Variant("A", "bot@1", 1.0), Variant("B", None, 1.0)), "user", 10,
                      now, now, started_at=now)


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'catalogue.db'}")
    else:
        database = Database(request.getfixturevalue("postgres")())
    names = Namespace(database, reserved={"base"})
    yield names, Catalogue(database, names), ExperimentStore(database, names)
    database.close()


def test_every_kind_of_name_refuses_every_other_kind(stores):
    names, catalogue, experiments = stores
    catalogue.add_version("bot", METADATA)
    catalogue.set_alias("prod", "bot")
    experiments.add(_experiment("tone"))
    for taken in ("bot", "prod", "base"):
        with pytest.raises(ExperimentNameConflictError):
            experiments.add(_experiment(taken))
    with pytest.raises(ExperimentNameConflictError, match="already exists"):
        experiments.add(_experiment("tone"))
    for taken in ("prod", "tone", "base"):
        with pytest.raises(NameConflictError):
            catalogue.add_version(taken, METADATA)
    for taken in ("bot", "tone", "base"):
        with pytest.raises(NameConflictError):
            catalogue.set_alias(taken, "bot")
    assert catalogue.add_version("bot", METADATA).version == 2  # a new version of an adapter: fine
    assert catalogue.set_alias("prod", "bot", 2).target == "bot@2"  # moving an alias: fine
    assert [names.get(n).kind for n in ("bot", "prod", "tone")] == ["adapter", "alias", "experiment"]


def test_deleting_frees_aliases_and_experiments_but_not_adapter_names(stores):
    names, catalogue, experiments = stores
    catalogue.add_version("bot", METADATA)
    catalogue.set_alias("prod", "bot")
    experiments.add(_experiment("tone"))
    catalogue.delete("bot")
    catalogue.delete_alias("prod")
    experiments.delete("tone")
    assert names.get("bot") == Name("bot", "adapter", None, False) and names.get("prod") is None
    with pytest.raises(ExperimentNameConflictError):
        experiments.add(_experiment("bot"))
    catalogue.add_version("prod", METADATA)  # the alias's name is free again...
    experiments.add(_experiment("tone"))  # ...and the experiment's
    assert names.get("prod").kind == "adapter" and names.get("tone").kind == "experiment"


def test_tenants_claim_their_own_names_and_learn_nothing_of_others(stores):
    names, catalogue, experiments = stores
    catalogue.add_version("acme-bot", METADATA, tenant="acme")
    catalogue.add_version("admin-bot", METADATA)
    catalogue.set_alias("acme-prod", "acme-bot", tenant="acme")
    experiments.add(_experiment("acme-exp"), tenant="acme")
    for taken in ("acme-bot", "acme-prod", "acme-exp", "admin-bot", "base"):
        with pytest.raises(NameConflictError, match=f"^name '{taken}' is not available$"):
            catalogue.add_version(taken, METADATA, tenant="globex")
        with pytest.raises(ExperimentNameConflictError, match=f"^name '{taken}' is not available$"):
            experiments.add(_experiment(taken), tenant="globex")
    assert catalogue.add_version("acme-bot", METADATA, tenant="acme").version == 2
    assert catalogue.add_version("acme-bot", METADATA).version == 3  # an admin may; the owner stays
    catalogue.delete("acme-bot")
    with pytest.raises(NameConflictError):
        catalogue.add_version("acme-bot", METADATA, tenant="globex")  # a deleted adapter's name stays acme's
    assert names.get("acme-bot") == Name("acme-bot", "adapter", "acme", False)
    assert names.owned_by("acme") == {"acme-bot", "acme-prod", "acme-exp"}
    names.set_public("admin-bot", True)
    assert names.visible_to("globex") == {"admin-bot"} and names.get("admin-bot").public


def test_a_claim_and_its_thing_are_written_together(stores):
    """A creation that fails after its claim leaves no claim (one transaction), so nothing to release."""
    names, catalogue, _ = stores
    with pytest.raises(AdapterNotFoundError):
        catalogue.set_alias("orphan", "nobody")  # the target does not exist
    assert names.get("orphan") is None
    catalogue.add_version("bot", METADATA)
    assert catalogue.set_alias("orphan", "bot").target == "bot@1"


# ---- over HTTP, auth off ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(llama_adapters):
    return {"helper-a": llama_adapters("ns_a", seed=801, r=4, lora_alpha=8),
            "helper-b": llama_adapters("ns_b", seed=802, r=4, lora_alpha=8, target_modules=["k_proj"])}


def _upload(url: str, name: str, directory) -> httpx.Response:
    files = {f: (f, (directory / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return httpx.post(url + "/v1/adapters", data={"name": name}, files=files, timeout=60)


def _conflict(response: httpx.Response) -> str:
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "name_conflict"
    return response.json()["error"]["message"]


def test_with_auth_off_no_path_takes_another_kinds_name(llama_dir, sources, tmp_path):
    store = tmp_path / "store"
    for name, directory in sources.items():
        shutil.copytree(directory, store / name)
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base")
    with RunningServer(settings) as server:
        url = server.url

        def complete(model: str) -> httpx.Response:
            return httpx.post(url + "/v1/completions", timeout=60,
                              json={"model": model, "prompt": "names!", "max_tokens": 2, "temperature": 0})

        variants = [{"name": "A", "adapter": "helper-a"}, {"name": "B", "adapter": "base"}]
        for name in ("tone", "other"):
            created = httpx.post(url + "/v1/experiments", json={"name": name, "variants": variants, "status": "running"})
            assert created.status_code == 201, created.text

        # an adapter named like a running experiment: refused, by upload and by a server path
        assert "experiment" in _conflict(_upload(url, "tone", sources["helper-b"]))
        loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "tone", "lora_path": "helper-b"})
        _conflict(loaded)
        answered = complete("tone")
        assert answered.status_code == 200 and answered.headers["x-experiment-variant"] in {"A", "B"}
        # the reverse: an experiment named like an adapter or an alias
        assert httpx.put(url + "/v1/aliases/prod", json={"target": "helper-b"}).status_code == 200
        for taken in ("helper-a", "prod", "base"):
            _conflict(httpx.post(url + "/v1/experiments", json={"name": taken, "variants": variants}))
        # an alias over an experiment's name
        _conflict(httpx.put(url + "/v1/aliases/tone", json={"target": "helper-b"}))
        assert complete("tone").headers["x-experiment-variant"] in {"A", "B"}
        # promotion to an alias that is an adapter's or an experiment's name
        for taken in ("helper-b", "other"):
            promoted = httpx.post(url + "/v1/experiments/tone/promote", json={"alias": taken, "variant": "A"})
            _conflict(promoted)
        assert httpx.get(url + "/v1/experiments/tone").json()["promotion"] is None
        promoted = httpx.post(url + "/v1/experiments/tone/promote", json={"alias": "prod", "variant": "A"})
        assert promoted.status_code == 200, promoted.text  # moving an existing alias is fine
        # deleting an experiment frees its name
        assert httpx.delete(url + "/v1/experiments/tone").status_code == 200
        assert _upload(url, "tone", sources["helper-b"]).status_code == 201
        assert complete("tone").status_code == 200 and "x-experiment-variant" not in complete("tone").headers
