"""Every input is bounded and checked: body sizes while streaming (413), malformed JSON and wrong types
(400 naming the field), prompt and max_tokens within the context, safe names, no path out of the store."""

import httpx
import pytest

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.server_harness import RunningServer

LIMIT = 8192


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("hardening")
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, served_model_name="base", max_request_body=LIMIT,
                        max_upload_size=LIMIT)
    with RunningServer(settings) as running:
        yield running


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_declared_body_over_the_limit_is_refused_before_reading(server):
    body = {"model": "base", "prompt": "x" * (LIMIT + 10), "max_tokens": 1}
    assert _error(httpx.post(server.url + "/v1/completions", json=body), 413)["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_cut_off_while_streaming(server):
    def chunks():
        yield b'{"model": "base", "prompt": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "exceeds the limit" in _error(response, 413)["message"]


def test_chunked_upload_over_the_limit_stores_nothing(server):
    boundary = "b0undary"

    def chunks():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nhuge\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"{WEIGHTS_FILE}\"; filename=\"w\"\r\n\r\n").encode()
        for _ in range(200):
            yield b"\0" * 1024

    response = httpx.post(server.url + "/v1/adapters", content=chunks(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    _error(response, 413)
    state_dir = server.settings.adapters_dir / ".loraserve"
    # The catalogue and the blob store's cross-process lock file (empty) are all there is.
    assert not [p for p in state_dir.rglob("*")
                if p.is_file() and not p.name.startswith("catalogue.db") and p.name != "blobs.lock"]
    assert httpx.get(server.url + "/v1/adapters").json()["total"] == 0


def test_the_server_still_serves_after_refusals(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "ok", "max_tokens": 2})
    assert response.status_code == 200


@pytest.mark.parametrize("content,param", [
    (b'{"model": "base", "prompt": ', None),  # malformed JSON
    (b'[1, 2, 3]', None),
    (b'{"model": "base", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    (b'{"model": "base", "prompt": "x", "temperature": {"a": 1}}', "temperature"),
    (b'{"model": 5, "prompt": "x"}', "model"),
    (b'{"prompt": "x"}', "model"),
])
def test_malformed_bodies_answer_400_naming_the_field(server, content, param):
    response = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    error = _error(response, 400)
    if param is not None:
        assert error["param"] == param and param in error["message"]


def test_prompt_and_max_tokens_are_bounded_by_the_context(server):
    for body in ({"model": "base", "prompt": "x" * 250, "max_tokens": 10},
                 {"model": "base", "prompt": "x", "max_tokens": 10_000}):
        assert _error(httpx.post(server.url + "/v1/completions", json=body), 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 200, "name with space", "nul\x00"])
def test_unsafe_names_are_refused(server, name):
    files = {CONFIG_FILE: (CONFIG_FILE, b"{}"), WEIGHTS_FILE: (WEIGHTS_FILE, b"")}
    response = httpx.post(server.url + "/v1/adapters", data={"name": name}, files=files)
    assert _error(response, 400)["code"] == "invalid_name"


@pytest.mark.parametrize("path", ["../", "/etc", "../../tmp", "/", "."])
def test_no_path_leaves_the_adapters_directory(server, path):
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "escape", "lora_path": path})
    assert _error(response, 403)["code"] == "path_not_allowed"
