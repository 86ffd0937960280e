"""The adapter registry over HTTP: upload → list → infer → new version → alias → delete, and restarts."""

import asyncio
import json

import httpx
import pytest

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.server_harness import RunningServer

PROMPT = "registry!"


@pytest.fixture(scope="module")
def sources(llama_adapters):
    return {
        "v1": llama_adapters("reg_v1", seed=401, r=8, lora_alpha=16),
        "v2": llama_adapters("reg_v2", seed=402, r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
    }


def _settings(llama_dir, store, **overrides) -> Settings:
    values = dict(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2,
                  served_model_name="base")
    values.update(overrides)
    return Settings(**values)


def _upload(url: str, name: str, directory, description: str = "", config: bytes | None = None,
            weights: bytes | None = None) -> httpx.Response:
    files = {
        CONFIG_FILE: (CONFIG_FILE, config if config is not None else (directory / CONFIG_FILE).read_bytes()),
        WEIGHTS_FILE: (WEIGHTS_FILE, weights if weights is not None else (directory / WEIGHTS_FILE).read_bytes()),
    }
    return httpx.post(url + "/v1/adapters", data={"name": name, "description": description}, files=files, timeout=60)


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def _text(url: str, model: str) -> str:
    response = _complete(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_lifecycle_and_restart(llama_dir, sources, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        base_text = _text(url, "base")

        created = _upload(url, "support-bot", sources["v1"], "first try")
        assert created.status_code == 201, created.text
        meta = created.json()
        assert (meta["id"], meta["version"], meta["rank"], meta["alpha"]) == ("support-bot@1", 1, 8, 16)
        assert meta["target_modules"] == ["q_proj", "v_proj"] and meta["description"] == "first try"
        # 2 layers x (q: A 8x64 + B 64x8, v: A 8x64 + B 32x8 with 2 kv heads of 16)
        assert meta["trainable_parameters"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))
        assert 0 < meta["trainable_ratio"] < 1 and len(meta["sha256"]) == 64

        listed = httpx.get(url + "/v1/adapters").json()
        assert [a["name"] for a in listed["data"]] == ["support-bot"] and listed["total"] == 1
        v1_text = _text(url, "support-bot")
        assert v1_text != base_text
        assert httpx.get(url + "/v1/adapters/support-bot").json()["resident"] in ("device", "host")

        second = _upload(url, "support-bot", sources["v2"])
        assert second.json()["version"] == 2
        v2_text = _text(url, "support-bot")
        assert v2_text not in (v1_text, base_text)
        assert _text(url, "support-bot@1") == v1_text
        detail = httpx.get(url + "/v1/adapters/support-bot").json()
        assert [v["version"] for v in detail["versions"]] == [1, 2]

        alias = httpx.put(url + "/v1/aliases/prod", json={"target": "support-bot@1"})
        assert alias.status_code == 200 and alias.json()["target"] == "support-bot@1"
        assert _text(url, "prod") == v1_text
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["base", "support-bot", "prod"]

        deleted = httpx.delete(url + "/v1/adapters/support-bot@2")
        assert deleted.json()["deleted"] == ["support-bot@2"]
        assert _text(url, "support-bot") == v1_text  # newest live version is 1 again
        assert _complete(url, "support-bot@2").status_code == 404

    with RunningServer(_settings(llama_dir, store)) as restarted:  # everything persisted
        assert _text(restarted.url, "support-bot") == v1_text
        assert _text(restarted.url, "prod") == v1_text
        assert _complete(restarted.url, "support-bot@2").status_code == 404
        assert httpx.delete(restarted.url + "/v1/adapters/support-bot").json()["deleted"] == ["support-bot@1"]
        assert _complete(restarted.url, "support-bot").status_code == 404


def test_refusals_leave_nothing_behind(llama_dir, sources, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with RunningServer(_settings(llama_dir, store, max_upload_size=40_000)) as server:
        url = server.url
        config = json.loads((sources["v1"] / CONFIG_FILE).read_text())
        bad = _upload(url, "bad", sources["v1"], config=json.dumps({**config, "r": 3}).encode())
        assert bad.status_code == 422
        assert "shape" in bad.json()["error"]["message"] and bad.json()["error"]["code"] == "invalid_adapter"
        too_big = _upload(url, "big", sources["v1"], weights=b"\0" * 50_000)
        assert too_big.status_code == 413
        assert _upload(url, "../evil", sources["v1"]).status_code == 400
        assert httpx.get(url + "/v1/adapters").json()["total"] == 0
        blobs = store / ".loraserve" / "blobs"
        assert not blobs.exists() or not any(blobs.iterdir())


def test_vllm_compatible_load_and_unload(llama_dir, sources, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(sources["v1"], store / "incoming" / "sql-helper")
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        loaded = httpx.post(url + "/v1/load_lora_adapter",
                            json={"lora_name": "sql", "lora_path": str(store / "incoming" / "sql-helper")})
        assert loaded.status_code == 200, loaded.text
        assert _complete(url, "sql").status_code == 200
        outside = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(sources["v2"])})
        assert outside.status_code == 403
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        assert _complete(url, "sql").status_code == 404


def test_warm_cool_and_queue_full(llama_dir, sources, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with RunningServer(_settings(llama_dir, store, max_queue=0)) as server:
        url = server.url
        assert _upload(url, "warmable", sources["v1"]).status_code == 201
        assert httpx.post(url + "/v1/adapters/warmable/warm").json()["resident"] == "device"
        assert httpx.post(url + "/v1/adapters/warmable/cool").json()["resident"] == "disk"
        busy = _complete(url, "base")  # max_queue=0: nothing may wait
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"


def test_pin_and_unpin_a_merged_copy(llama_dir, sources, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with RunningServer(_settings(llama_dir, store, merged_budget=16 * 1024**2)) as server:
        url = server.url
        assert _upload(url, "pinme", sources["v1"]).status_code == 201
        unmerged = _text(url, "pinme")
        pinned = httpx.post(url + "/v1/adapters/pinme/merge").json()
        assert pinned["merge"]["pinned"] is True
        asyncio.run(server.state.engine.wait_for_merges())
        detail = httpx.get(url + "/v1/adapters/pinme").json()
        assert detail["resident"] == "merged" and detail["merge"]["events"][0]["action"] == "promote"
        assert _text(url, "pinme") == unmerged
        assert "loraserve_merge_promotions_total 1.0" in httpx.get(url + "/metrics").text
        unpinned = httpx.delete(url + "/v1/adapters/pinme/merge").json()
        assert unpinned["merge"]["pinned"] is False
        assert httpx.post(url + "/v1/adapters/base/merge").status_code == 400
