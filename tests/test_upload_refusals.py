"""Every kind of bad upload through the HTTP API is refused with its reason, and nothing of it is stored:
neither a catalogue row nor a blob (nor a leftover temporary)."""

import json
import pickle
import struct

import httpx
import pytest
import torch
from safetensors.torch import save

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, MAX_HEADER_BYTES, WEIGHTS_FILE
from tests.factories import build_model, llama_config, make_adapter, save_model
from tests.server_harness import RunningServer

MAX_RANK = 8
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def good(llama_adapters):
    return llama_adapters("refuse_ok", seed=701, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def files(good, llama_adapters, tmp_path_factory):
    """name -> (config bytes, weights bytes) of a good adapter and of adapters made for other bases."""
    config, weights = (good / CONFIG_FILE).read_bytes(), (good / WEIGHTS_FILE).read_bytes()
    root = tmp_path_factory.mktemp("other_bases")
    out = {"good": (config, weights)}
    for name, overrides in {"wider": {"hidden_size": 32, "intermediate_size": 64},
                            "deeper": {"num_hidden_layers": 3}}.items():
        base = save_model(build_model(llama_config(**overrides)), root / name / "base")
        adapter = make_adapter(base, root / name / "adapter", seed=7, r=4, lora_alpha=8)
        out[name] = ((adapter / CONFIG_FILE).read_bytes(), (adapter / WEIGHTS_FILE).read_bytes())
    big = llama_adapters("refuse_r16", seed=702, r=16, lora_alpha=16, target_modules=["q_proj"])
    out["rank16"] = ((big / CONFIG_FILE).read_bytes(), (big / WEIGHTS_FILE).read_bytes())
    return out


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("refusals")
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base", max_lora_rank=MAX_RANK)
    with RunningServer(settings) as running:
        yield running


def _tensors_edited(weights: bytes, edit) -> bytes:
    from safetensors.torch import load

    tensors = load(weights)
    edit(tensors)
    return save(tensors)


def _lying_header(weights: bytes) -> bytes:
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    header[Q_A]["data_offsets"][1] += 4096  # says the tensor is longer than the file
    encoded = json.dumps(header).encode().ljust(length)
    return struct.pack("<Q", len(encoded)) + encoded + weights[8 + length:]


def _huge_header() -> bytes:
    length = MAX_HEADER_BYTES + 8
    return struct.pack("<Q", length) + b"{" + b" " * (length - 2) + b"}"


def _config(good_config: bytes, **changes) -> bytes:
    return json.dumps({**json.loads(good_config), **changes}).encode()


def _cases(files):
    config, weights = files["good"]
    nan = lambda t: t[Q_A].__setitem__((0, 0), float("nan"))  # noqa: E731
    return {
        "pickle": (config, pickle.dumps({"w": [1.0, 2.0]}), r"header of \d+ bytes exceeds|not a valid safetensors"),
        "not_safetensors": (config, b"PK\x03\x04 a zip, not tensors" * 4, r"exceeds the limit|not a valid safetensors|truncated"),
        "truncated_prefix": (config, weights[:5], "truncated"),
        "truncated_data": (config, weights[: len(weights) - 100], "not a valid safetensors"),
        "lying_header": (config, _lying_header(weights), "not a valid safetensors"),
        "huge_header": (config, _huge_header(), f"exceeds the limit of {MAX_HEADER_BYTES} bytes"),
        "unknown_module": (config, _tensors_edited(weights, lambda t: t.__setitem__(
            Q_A.replace("q_proj", "nope_proj"), t.pop(Q_A))), "no linear module named"),
        "wrong_shape": (config, _tensors_edited(weights, lambda t: t.__setitem__(Q_A, torch.ones(4, 7))), r"shape \(4, 7\)"),
        "rank_too_high": (*files["rank16"][:2], f"exceeds the server's max_lora_rank {MAX_RANK}"),
        "nan": (config, _tensors_edited(weights, nan), "NaN or Inf"),
        "inf": (config, _tensors_edited(weights, lambda t: t.__setitem__(Q_A, t[Q_A] / 0)), "NaN or Inf"),
        "dtype_int": (config, _tensors_edited(weights, lambda t: t.__setitem__(Q_A, t[Q_A].to(torch.int32))), "dtype"),
        "dtype_f64": (config, _tensors_edited(weights, lambda t: t.__setitem__(Q_A, t[Q_A].double())), "dtype"),
        "config_wrong_type": (_config(config, r="eight"), weights, "r:"),
        "config_unknown_peft_type": (_config(config, peft_type="IA3"), weights, "peft_type: 'IA3' is not supported"),
        "config_not_json": (b"{not json", weights, "not valid JSON"),
        "other_base_dims": (*files["wider"][:2], "shape"),
        "other_base_layers": (*files["deeper"][:2], "no linear module named 'model.layers.2"),
    }


CASES = ["pickle", "not_safetensors", "truncated_prefix", "truncated_data", "lying_header", "huge_header",
         "unknown_module", "wrong_shape", "rank_too_high", "nan", "inf", "dtype_int", "dtype_f64",
         "config_wrong_type", "config_unknown_peft_type", "config_not_json", "other_base_dims", "other_base_layers"]


def _stored(server) -> tuple:
    state_dir = server.settings.adapters_dir / ".loraserve"
    blobs = sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file()
                   and not p.name.startswith("catalogue.db"))
    listing = httpx.get(server.url + "/v1/adapters").json()
    return blobs, listing["total"], [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


@pytest.mark.parametrize("case", CASES)
def test_bad_upload_is_refused_and_nothing_is_stored(server, files, case):
    import re

    config, weights, reason = _cases(files)[case]
    before = _stored(server)
    response = httpx.post(server.url + "/v1/adapters", data={"name": f"bad-{case.replace('_', '-')}"}, timeout=60,
                          files={CONFIG_FILE: (CONFIG_FILE, config), WEIGHTS_FILE: (WEIGHTS_FILE, weights)})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter" and re.search(reason, error["message"]), error["message"]
    assert _stored(server) == before
    assert server.state.registry.catalogue.latest(f"bad-{case.replace('_', '-')}", include_deleted=True) is None


def test_good_upload_is_stored(server, files):
    """The control: the same path with the good files stores a blob and a version."""
    before = _stored(server)
    config, weights = files["good"]
    response = httpx.post(server.url + "/v1/adapters", data={"name": "good-one"}, timeout=60,
                          files={CONFIG_FILE: (CONFIG_FILE, config), WEIGHTS_FILE: (WEIGHTS_FILE, weights)})
    assert response.status_code == 201, response.text
    assert _stored(server) != before


def test_upload_above_the_size_limit_is_refused_while_streaming(llama_dir, tmp_path, files):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base", max_upload_size=4096)
    config, weights = files["good"]
    with RunningServer(settings) as running:
        before = _stored(running)
        response = httpx.post(running.url + "/v1/adapters", data={"name": "too-big"}, timeout=60,
                              files={CONFIG_FILE: (CONFIG_FILE, config), WEIGHTS_FILE: (WEIGHTS_FILE, weights)})
        assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
        assert _stored(running) == before
