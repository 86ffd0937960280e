"""A hostile tenant against a real server (a subprocess on loopback, auth on, two tenants): every bad
input gets a 4xx in the OpenAI error shape (or is served harmlessly), never a 5xx; a victim stream of
the other tenant runs during every case and its text equals its solo run; /health answers within a
second; memory returns to its baseline after a storm of oversized names; upload/delete cycles leave
the disk flat. Bounded in count and time; loopback only."""

import json
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.factories import VOCAB
from tests.server_harness import ServerProcess

ADMIN_KEY = "lsk_hostile-test-admin-key"
VICTIM_BODY = {"model": "victim", "prompt": "the victim's stream", "max_tokens": 230, "temperature": 0,
               "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def victim_adapter(llama_adapters) -> Path:
    return llama_adapters("hostile_victim", seed=1201, r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("hostile_store")
    settings = {"admin_key": ADMIN_KEY, "cpu_kernel": "false", "dtype": "float32", "device": "cpu",
                "kv_cache_memory": 32 * 1024**2, "log_format": "text"}
    with ServerProcess(llama_dir, store, settings, extra_env={"OMP_NUM_THREADS": "1"}) as running:
        running.store = store
        yield running


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    out = {"admin": ADMIN_KEY}
    for tenant in ("acme", "evil"):
        assert httpx.post(server.url + "/v1/admin/tenants", json={"name": tenant}, headers=admin).status_code == 201
        made = httpx.post(server.url + "/v1/admin/keys", json={"role": "tenant", "tenant": tenant}, headers=admin)
        out[tenant] = made.json()["key"]
    return out


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _files(directory: Path, config: dict | None = None) -> dict:
    config_bytes = json.dumps(config).encode() if config is not None else (directory / CONFIG_FILE).read_bytes()
    return {CONFIG_FILE: (CONFIG_FILE, config_bytes), WEIGHTS_FILE: (WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes())}


@pytest.fixture(scope="module")
def victim(server, keys, victim_adapter) -> str:
    """acme's adapter uploaded, and the text of the victim stream run alone."""
    upload = httpx.post(server.url + "/v1/adapters", data={"name": "victim"}, files=_files(victim_adapter),
                        headers=_auth(keys["acme"]), timeout=60)
    assert upload.status_code == 201, upload.text
    return _stream_text(server.url, keys["acme"])


def _stream_text(url: str, key: str, first_token: threading.Event | None = None) -> str:
    text, finish = "", None
    with httpx.stream("POST", url + "/v1/completions", json=VICTIM_BODY, headers=_auth(key), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                if first_token is not None:
                    first_token.set()
    assert finish == "length", f"the victim stream ended with {finish!r}"
    return text


@contextmanager
def _victim_running(url: str, key: str, expected: str):
    """The victim stream runs while the block runs; afterwards its text must equal the solo run."""
    result: dict[str, object] = {}
    first_token = threading.Event()
    thread = threading.Thread(target=lambda: result.update(text=_stream_text(url, key, first_token)))
    thread.start()
    assert first_token.wait(timeout=60), "the victim stream did not start"  # admitted and decoding
    try:
        yield
        assert thread.is_alive(), "the victim finished before the case ran: the test proves nothing"
    finally:
        thread.join(timeout=120)
    assert result.get("text") == expected, "the victim's output changed"


def _health_latency(url: str) -> float:
    started = time.perf_counter()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.perf_counter() - started


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- the cases: (name, request builder, expected status) ---------------------------------------------

def _complete(**body) -> Callable[[str, str], httpx.Response]:
    payload = {"model": "base", "prompt": "x", "max_tokens": 4, **body}
    return lambda url, key: httpx.post(url + "/v1/completions", json=payload, headers=_auth(key), timeout=60)


def _upload(config_changes: dict) -> Callable[[str, str], httpx.Response]:
    def send(url: str, key: str) -> httpx.Response:
        directory = _upload.adapter
        config = {**json.loads((directory / CONFIG_FILE).read_text()), **config_changes}
        files = _files(directory, config)
        return httpx.post(url + "/v1/adapters", data={"name": "evil-upload"}, files=files, headers=_auth(key),
                          timeout=60)
    return send


def _raw_body(path: str, text: str) -> Callable[[str, str], httpx.Response]:
    """A JSON body written by hand: a client library would refuse to encode a lone surrogate."""
    return lambda url, key: httpx.post(url + path, content=text.encode(), timeout=60,
                                       headers={**_auth(key), "content-type": "application/json"})


CASES = [
    ("token id = vocabulary size", _complete(prompt=[VOCAB]), 400),
    ("token id -1", _complete(prompt=[-1]), 400),
    ("token id 2**63", _complete(prompt=[2**63]), 400),
    ("temperature 1e-300", _complete(temperature=1e-300, max_tokens=8), 200),
    ("temperature 1e-45", _complete(temperature=1e-45, max_tokens=8), 200),
    ("top_p 1e-300", _complete(top_p=1e-300, max_tokens=8), 200),
    ("seed 2**64", _complete(seed=2**64), 400),
    ("lone surrogate in a prompt",
     _raw_body("/v1/completions", '{"model": "base", "prompt": "a\\ud800b", "max_tokens": 4}'), 400),
    ("lone surrogate in a chat message", _raw_body("/v1/chat/completions", '{"model": "base", "max_tokens": 4, '
                                                   '"messages": [{"role": "user", "content": "a\\udfffb"}]}'), 400),
    ("a 1.5 MB model name", _complete(model="m" * 1_500_000), 400),
    ("lora_alpha Infinity", _upload({"lora_alpha": float("inf")}), 422),
    ("lora_alpha NaN", _upload({"lora_alpha": float("nan")}), 422),
    ("invalid target_modules regex", _upload({"target_modules": "("}), 422),
    ("invalid rank_pattern key", _upload({"rank_pattern": {"(": 4}}), 422),
    ("catastrophic target_modules regex", _upload({"target_modules": r"(?=.*0\.self_attn\.q_proj$).{6}(?:.+)+X"}),
     422),
    ("backtracking target_modules regex", _upload({"target_modules": r"(?:.+)+(?:.+)+(?:.+)+(?:.+)+X"}), 422),
    ("experiment min_samples 2**63", lambda url, key: httpx.post(url + "/v1/experiments", headers=_auth(key), json={
        "name": "evil-exp", "min_samples": 2**63,
        "variants": [{"name": "a", "adapter": "base"}, {"name": "b", "adapter": "base"}]}), 400),
    ("feedback score 1e308", lambda url, key: httpx.post(url + "/v1/feedback", headers=_auth(key), json={
        "request_id": "anything", "score": 1e308}), 400),
    ("/metrics without an admin key", lambda url, key: httpx.get(url + "/metrics", headers=_auth(key)), 403),
]


@pytest.mark.parametrize("name, send, status", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_request_harms_nobody(server, keys, victim, victim_adapter, name, send, status):
    _upload.adapter = victim_adapter
    latencies = []
    with _victim_running(server.url, keys["acme"], victim):
        done = threading.Event()

        def probe_health():
            while not done.is_set():
                latencies.append(_health_latency(server.url))
                time.sleep(0.05)

        prober = threading.Thread(target=probe_health)
        prober.start()
        try:
            response = send(server.url, keys["evil"])
        finally:
            done.set()
            prober.join()
    if status == 200:
        assert response.status_code == 200, response.text[:500]
        assert response.json()["choices"][0]["finish_reason"] == "length"
    else:
        _assert_openai_error(response, status)
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f} s during the case"


def test_a_huge_header_is_refused_at_once(server, keys, victim):
    """64 MB of header: the server answers 431 after its limit, long before the client is done."""
    with _victim_running(server.url, keys["acme"], victim):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk, sent = b"a" * (1 << 20), 0
            try:
                while sent < 64 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the server closed the connection mid-header: what we want
                pass
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
        assert _health_latency(server.url) < 1.0


def test_experiment_request_ids_are_per_tenant(server, keys, victim):
    """Two tenants sending the same X-Request-ID to their own experiments do not collide (was a 409)."""
    for tenant in ("acme", "evil"):
        created = httpx.post(server.url + "/v1/experiments", headers=_auth(keys[tenant]), json={
            "name": f"{tenant}-exp", "status": "running",
            "variants": [{"name": "a", "adapter": "base"}, {"name": "b", "adapter": "base"}]})
        assert created.status_code == 201, created.text
    for tenant in ("acme", "evil"):
        answer = httpx.post(server.url + "/v1/completions", json={
            "model": f"{tenant}-exp", "prompt": "x", "max_tokens": 2, "user": "u"},
            headers={**_auth(keys[tenant]), "X-Request-ID": "shared-id"}, timeout=60)
        assert answer.status_code == 200, answer.text
        scored = httpx.post(server.url + "/v1/feedback", headers=_auth(keys[tenant]),
                            json={"request_id": "shared-id", "score": 1})
        assert scored.status_code == 201 and scored.json()["experiment"] == f"{tenant}-exp"


def test_memory_returns_to_its_baseline_after_a_storm_of_oversized_names(server, keys, victim):
    def storm(count: int) -> None:
        with httpx.Client(base_url=server.url, headers=_auth(keys["evil"]), timeout=60) as http:
            for i in range(count):
                model = f"{i:08d}" + "m" * 1_500_000  # distinct every time
                response = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
                assert response.status_code == 400

    storm(20)  # warm-up: allocator arenas and caches reach their working size
    baseline = server.rss_bytes()
    storm(120)
    time.sleep(0.5)
    grown = server.rss_bytes() / baseline - 1
    assert grown < 0.10, f"memory grew by {grown:.1%} after 120 oversized names ({server.rss_bytes() >> 20} MiB)"


def test_upload_delete_cycles_leave_the_disk_flat(server, keys, victim, victim_adapter):
    blobs = server.store / ".loraserve" / "blobs"

    def disk() -> int:
        return sum(f.stat().st_size for f in blobs.glob("*/*"))

    baseline = disk()
    for cycle in range(6):
        config = {**json.loads((victim_adapter / CONFIG_FILE).read_text()), "lora_dropout": 0.01 * (cycle + 1)}
        uploaded = httpx.post(server.url + "/v1/adapters", data={"name": "cycled"},
                              files=_files(victim_adapter, config), headers=_auth(keys["evil"]), timeout=60)
        assert uploaded.status_code == 201, uploaded.text
        assert disk() > baseline
        assert httpx.delete(server.url + "/v1/adapters/cycled", headers=_auth(keys["evil"])).status_code == 200
    assert disk() == baseline
