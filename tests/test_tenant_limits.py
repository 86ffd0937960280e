"""Per-tenant limits: requests and tokens per minute (429 with Retry-After), requests in flight, and
the adapter quota (count and stored bytes); admins have none."""

import time

import httpx
import pytest

from server.config import Settings
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.tenancy.errors import RateLimitedError
from server.tenancy.limits import TenantLimiter
from tests.server_harness import RunningServer

ADMIN_KEY = "limits-admin"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refill_and_retry_after():
    clock = Clock()
    limiter = TenantLimiter(requests_per_minute=2, tokens_per_minute=0, max_concurrent=0, clock=clock)
    limiter.admit("a", 10)()
    limiter.admit("a", 10)()
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a", 10)
    assert info.value.retry_after == 30  # one request comes back every 30 s
    limiter.admit("b", 10)()  # another tenant has its own bucket
    clock.now += 30
    limiter.admit("a", 10)()


def test_tokens_per_minute_and_in_flight():
    clock = Clock()
    limiter = TenantLimiter(requests_per_minute=0, tokens_per_minute=100, max_concurrent=2, clock=clock)
    first = limiter.admit("a", 60)
    with pytest.raises(RateLimitedError, match="tokens per minute") as info:
        limiter.admit("a", 60)
    assert info.value.retry_after == 12  # 20 tokens missing at 100/min
    second = limiter.admit("a", 40)
    clock.now += 60
    with pytest.raises(RateLimitedError, match="in flight"):
        limiter.admit("a", 1)
    first()
    first()  # releasing twice releases once
    third = limiter.admit("a", 1)
    with pytest.raises(RateLimitedError, match="in flight"):
        limiter.admit("a", 1)
    second(), third()


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path_factory.mktemp("limits"), dtype="float32",
                        device="cpu", kv_cache_memory=16 * 1024**2, served_model_name="base", admin_key=ADMIN_KEY,
                        tenant_requests_per_minute=3, tenant_max_concurrent=1, tenant_max_adapters=1,
                        tenant_max_adapter_bytes=30_000)
    with RunningServer(settings) as running:
        yield running


def _key(server, tenant: str) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.post(server.url + "/v1/admin/tenants", json={"name": tenant}, headers=headers)
    key = httpx.post(server.url + "/v1/admin/keys", json={"role": "tenant", "tenant": tenant}, headers=headers)
    return {"Authorization": f"Bearer {key.json()['key']}"}


def _complete(server, headers, **extra):
    body = {"model": "base", "prompt": "limits", "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)


def test_rate_limit_answers_429_with_retry_after(server):
    headers = _key(server, "hasty")
    assert [_complete(server, headers).status_code for _ in range(3)] == [200, 200, 200]
    refused = _complete(server, headers)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert all(_complete(server, admin).status_code == 200 for _ in range(4))  # admins are not limited
    assert _complete(server, _key(server, "calm")).status_code == 200  # nor are other tenants by this one


def test_requests_in_flight_are_limited_and_released(server):
    headers = _key(server, "streamer")
    held = server.state.limits.admit("streamer", 1)  # one request in flight already
    busy = _complete(server, headers)
    assert busy.status_code == 429 and "in flight" in busy.json()["error"]["message"]
    held()
    body = {"model": "base", "prompt": "limits", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as stream:
        next(stream.iter_lines())  # then leave mid-stream
    for _ in range(100):  # the client left: its place comes back as soon as the server notices
        if server.state.limits._state("streamer").in_flight == 0:
            break
        time.sleep(0.05)
    assert server.state.limits._state("streamer").in_flight == 0
    assert _complete(server, headers).status_code == 200


def test_adapter_quota_count_and_bytes(server, llama_adapters):
    small = llama_adapters("quota_small", seed=801, r=4, lora_alpha=8, target_modules=["q_proj"])
    big = llama_adapters("quota_big", seed=802, r=16, lora_alpha=16)
    headers = _key(server, "collector")

    def upload(name, directory):
        files = {f: (f, (directory / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        return httpx.post(server.url + "/v1/adapters", data={"name": name}, files=files, headers=headers, timeout=60)

    assert upload("col-one", small).status_code == 201
    second = upload("col-two", small)
    assert second.status_code == 403 and second.json()["error"]["code"] == "quota_exceeded"
    too_big = upload("col-one", big)  # a new version of its one name, but beyond the bytes quota
    assert too_big.status_code == 403 and "stored bytes" in too_big.json()["error"]["message"]
    versions = httpx.get(server.url + "/v1/adapters/col-one", headers=headers).json()["versions"]
    assert [v["version"] for v in versions] == [1]
