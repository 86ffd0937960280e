"""`loraserve cluster` for real: a local Ray instance, Ray Serve, 2 engine replicas of the tiny test model and
the HTTP front in this process, one catalogue on a real PostgreSQL server and one shared adapter store, auth
on. Ray Serve's HTTP proxy and Ingress deployment (deploy/serve.yaml's entry point) front the same replicas
on a port of their own. One cluster for the module (starting it takes ~40 s on 2 cores); the test that kills
a replica runs last."""

import concurrent.futures
import json
import re
import time
from collections.abc import Callable
from itertools import count

import httpx
import openai
import pytest
import ray
from ray import serve

from server.cluster.asgi_bridge import Start
from server.cluster.deployment import APP_NAME
from server.cluster.front import Front
from server.cluster.launch import deploy, init_ray
from server.cluster.policy import ReplicaView, home_of
from server.config import Settings
from server.engine.sequence import SamplingParams
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.factories import make_engine
from tests.postgres_server import postgres  # noqa: F401  (a fixture)
from tests.server_harness import free_port


ADMIN_KEY = "lsk_cluster-admin-key-for-the-tests"
BASE = "tiny-llama"
REQUESTS_PER_MINUTE = 8
METRICS_PORT = free_port()  # Ray's metrics agent: every replica's exported series
PROXY_URL = f"http://127.0.0.1:{free_port()}"  # Ray Serve's HTTP proxy, in front of the Ingress deployment
ADAPTERS = {"resident": dict(seed=901, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            "second": dict(seed=903, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            "uploaded": dict(seed=902, r=4, lora_alpha=16, target_modules=["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(name, **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="module")
def front(llama_dir, adapter_dirs, postgres, tmp_path_factory):  # noqa: F811
    store = tmp_path_factory.mktemp("shared-store")
    settings = Settings(
        model=llama_dir, adapters_dir=store, catalogue_url=postgres(), dtype="float32", device="cpu",
        kv_cache_memory=32 * 1024**2, max_loras=2, served_model_name=BASE, torch_threads=1, cpu_kernel=False,
        lora=[f"{name}={adapter_dirs[name]}" for name in ("resident", "second")], admin_key=ADMIN_KEY, shared_limits=True,
        tenant_requests_per_minute=REQUESTS_PER_MINUTE, replicas=2, replica_cpus=0.25, port=free_port(),
        shutdown_grace_seconds=1)
    init_ray(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 500})
    front = None
    try:
        deploy(settings.model_copy(update={"port": int(PROXY_URL.rpartition(":")[2])}), serve_proxy=True)
        front = Front(settings).start()
        yield front
    finally:
        if front is not None:
            front.stop()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(front) -> str:
    return front.url


@pytest.fixture(scope="module")
def reference(llama_dir, adapter_dirs):
    engine = make_engine(llama_dir)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)

    def run(prompt: str, adapter: str | None, max_tokens: int) -> str:
        return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0), [adapter])[0].text
    return run


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _complete(url: str, model: str, headers=ADMIN, max_tokens: int = 8, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                      json={"model": model, "prompt": "Hello, cluster!", "max_tokens": max_tokens, "temperature": 0,
                            **extra})


def _key(url: str, tenant: str) -> dict[str, str]:
    assert httpx.post(url + "/v1/admin/tenants", headers=ADMIN, json={"name": tenant}).status_code == 201
    created = httpx.post(url + "/v1/admin/keys", headers=ADMIN, json={"role": "tenant", "tenant": tenant})
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['key']}", "X-Key-Id": created.json()["id"]}


@pytest.mark.parametrize("entry", ["front", "serve proxy"])
def test_the_openai_client_gets_what_one_engine_gives(cluster, reference, entry):
    """Through `loraserve cluster`'s front, and through Ray Serve's proxy and Ingress (deploy/serve.yaml)."""
    url = cluster if entry == "front" else PROXY_URL
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY)
    assert [m.id for m in client.models.list().data] == [BASE, "resident", "second"]
    base, adapted = reference("Hello, cluster!", None, 12), reference("Hello, cluster!", "resident", 12)
    assert base != adapted  # the adapter changes the output, so equality below means something
    for model, expected in ((BASE, base), ("resident", adapted)):
        result = client.completions.create(model=model, prompt="Hello, cluster!", max_tokens=12, temperature=0)
        assert result.choices[0].text == expected
        chunks = list(client.completions.create(model=model, prompt="Hello, cluster!", max_tokens=12,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    assert missing.value.body["code"] == "model_not_found"  # the single server's error shape, unchanged
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="lsk_wrong").models.list()


def test_the_front_holds_the_single_servers_connection_limits(cluster):
    """`loraserve cluster` serves HTTP with `loraserve serve`'s uvicorn server (server/api/http_server.py)."""
    answer = httpx.get(cluster + "/health", headers={f"X-F{i}": "v" for i in range(150)})  # over 100 fields
    assert answer.status_code == 431 and answer.json()["error"]["code"] == "request_header_fields_too_large"
    assert "x-replica" not in answer.headers  # refused by the front itself, before any replica


def test_an_adapter_sticks_to_its_replica_and_base_requests_spread(cluster):
    served = [_complete(cluster, "resident") for _ in range(12)]
    assert all(r.status_code == 200 for r in served)
    assert len({r.headers["x-replica"] for r in served[1:]}) == 1  # after the first: the replica holding it
    base = [_complete(cluster, BASE) for _ in range(16)]
    assert len({r.headers["x-replica"] for r in base}) == 2  # idle replicas tie: either one


def test_an_upload_through_one_replica_is_served_by_the_other(cluster, adapter_dirs, reference):
    files = {name: (name, (adapter_dirs["uploaded"] / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    upload = httpx.post(cluster + "/v1/adapters", headers=ADMIN, data={"name": "uploaded"}, files=files, timeout=60)
    assert upload.status_code == 201, upload.text
    # Bursts big enough that the replica holding it crosses the load line and the other one loads it too;
    # whether one burst does depends on when the load reports land, so up to five.
    answers = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            answers += pool.map(lambda _: _complete(cluster, "uploaded", max_tokens=48), range(16))
            if len({a.headers.get("x-replica") for a in answers}) == 2:
                break
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    by_replica = {a.headers["x-replica"] for a in answers}
    assert upload.headers["x-replica"] in by_replica and len(by_replica) == 2
    expected = reference("Hello, cluster!", "uploaded", 48)
    assert expected != reference("Hello, cluster!", None, 48)
    assert {a.json()["choices"][0]["text"] for a in answers} == {expected}


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(cluster):
    key = _key(cluster, "revoked-tenant")
    replicas = _replicas(cluster)

    def ask(replica: str) -> int:  # each replica directly: through the proxy, a second's requests may all land on one
        return _on(replica, replicas, "GET", "/v1/models", authorization=key["Authorization"])[0]
    assert [ask(r) for r in replicas] == [200, 200]  # both replicas know the key (and remember it for up to a second)
    _honoured_everywhere_within_a_second(
        replicas, lambda: _on(replicas[0], replicas, "DELETE", f"/v1/admin/keys/{key['X-Key-Id']}"), ask, 401)


def _replicas(url: str) -> list[str]:
    """Both replicas' ids (X-Replica), from base requests (idle replicas tie: either one)."""
    seen = {httpx.get(url + "/v1/models", headers=ADMIN).headers["x-replica"] for _ in range(16)}
    assert len(seen) == 2
    return sorted(seen)


def _on(replica: str, replicas: list[str], method: str, path: str, body: dict | None = None,
        authorization: str = ADMIN["Authorization"]) -> tuple[int, bytes]:
    """One request played into the replica `replica` through Ray Serve's router: the handle names an
    affinity key that no replica holds and whose rendezvous home is `replica`, so the idle cluster sends it
    there (checked by its X-Replica)."""
    views = [ReplicaView(r, 0) for r in replicas]
    key = next(k for k in (f"pin-{replica}-{i}" for i in count()) if home_of(k, views) == replica)
    handle = serve.get_deployment_handle("EngineReplica", APP_NAME).options(stream=True, multiplexed_model_id=key)
    envelope = {"method": method, "path": path, "query_string": b"", "client": None,
                "headers": [(b"authorization", authorization.encode()), (b"content-type", b"application/json")],
                "body": json.dumps(body).encode() if body is not None else b""}
    start, *pieces = list(handle.handle.remote(envelope))
    assert isinstance(start, Start) and dict(start.headers)[b"x-replica"] == replica.encode()
    return start.status, b"".join(pieces)


def _honoured_everywhere_within_a_second(replicas: list[str], change: Callable[[], tuple[int, bytes]],
                                         ask: Callable[[str], object], expected: object) -> None:
    """`change()` through the first replica; from one second after it, every replica's `ask` is `expected`."""
    status, body = change()
    assert status == 200, body
    at = time.monotonic()
    late: dict[str, list[object]] = {r: [] for r in replicas}
    while time.monotonic() - at < 2.0:
        for replica in replicas:
            answer = ask(replica)
            if time.monotonic() - at > 1.0:
                late[replica].append(answer)
    assert all(answers and set(answers) == {expected} for answers in late.values()), late


def _completion(replica: str, replicas: list[str], model: str) -> tuple[int, str | None]:
    status, body = _on(replica, replicas, "POST", "/v1/completions",
                       {"model": model, "prompt": "Hello, cluster!", "max_tokens": 6, "temperature": 0, "user": "u1"})
    return status, json.loads(body)["choices"][0]["text"] if status == 200 else None


def test_an_alias_change_on_one_replica_is_honoured_by_every_replica_within_a_second(cluster, reference):
    replicas = _replicas(cluster)
    before, after = reference("Hello, cluster!", "resident", 6), reference("Hello, cluster!", "second", 6)
    assert before != after
    status, _ = _on(replicas[0], replicas, "PUT", "/v1/aliases/prod", {"target": "resident"})
    assert status == 200
    assert {_completion(r, replicas, "prod") for r in replicas} == {(200, before)}  # both remember it now
    _honoured_everywhere_within_a_second(
        replicas, lambda: _on(replicas[0], replicas, "PUT", "/v1/aliases/prod", {"target": "second"}),
        lambda replica: _completion(replica, replicas, "prod"), (200, after))


def test_an_experiment_change_on_one_replica_is_honoured_by_every_replica_within_a_second(cluster):
    replicas = _replicas(cluster)
    variants = [{"name": "A", "adapter": "resident"}, {"name": "B", "adapter": "second"}]
    status, body = _on(replicas[0], replicas, "POST", "/v1/experiments",
                       {"name": "ab", "variants": variants, "status": "running"})
    assert status == 201, body
    assert {_completion(r, replicas, "ab")[0] for r in replicas} == {200}  # both remember it running
    _honoured_everywhere_within_a_second(
        replicas, lambda: _on(replicas[0], replicas, "PATCH", "/v1/experiments/ab", {"status": "paused"}),
        lambda replica: _completion(replica, replicas, "ab")[0], 409)


def test_a_tenant_rate_limit_holds_for_the_cluster_not_per_replica(cluster):
    key = {"Authorization": _key(cluster, "limited-tenant")["Authorization"]}
    answers = [_complete(cluster, BASE, headers=key, max_tokens=1) for _ in range(2 * REQUESTS_PER_MINUTE)]
    assert len({a.headers["x-replica"] for a in answers}) == 2
    codes = [a.status_code for a in answers]
    assert codes.count(200) == REQUESTS_PER_MINUTE and codes.count(429) == REQUESTS_PER_MINUTE, codes
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"


def test_each_replica_exports_its_engine_gauges_with_a_replica_label(cluster):
    replicas = {_complete(cluster, "resident").headers["x-replica"]} | {
        _complete(cluster, BASE).headers["x-replica"] for _ in range(8)}
    pattern = re.compile(r'^(?:ray_)?loraserve_replica_slot_loads\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$', re.M)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        exported = dict(pattern.findall(httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text))
        if set(exported) >= replicas and any(float(v) > 0 for v in exported.values()):
            break
        time.sleep(1)
    assert set(exported) >= replicas and any(float(v) > 0 for v in exported.values()), exported


def _sse(lines) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in lines if line.startswith("data: ")]


def _stream(url: str, model: str, max_tokens: int = 16) -> tuple[str, str]:
    """One streamed completion: the replica that gave it and its text."""
    body = {"model": model, "prompt": "Hello, cluster!", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", headers=ADMIN, json=body, timeout=60) as streamed:
        events = _sse(streamed.iter_lines())
        assert events[-1] == "[DONE]", events[-2:]
        return streamed.headers["x-replica"], "".join(e["choices"][0]["text"] for e in events[:-1])


def _channels(front: Front | None = None) -> dict[str, str]:
    """The channels the front's ingress has open (by replica), or the Ingress deployment's without `front`."""
    if front is not None:
        return front.ingress.open_channels()
    return serve.get_deployment_handle("Ingress", APP_NAME).open_channels.remote().result()


def _until_channels_to(replicas: set[str], front: Front | None = None) -> None:
    deadline = time.monotonic() + 10
    while not replicas <= set(_channels(front)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert replicas <= set(_channels(front)), (replicas, _channels(front))


@pytest.mark.parametrize("entry", ["front", "serve proxy"])
def test_streams_come_on_one_channel_per_replica_with_the_text_of_one_engine(front, reference, entry):
    url, ingress_of = (front.url, front) if entry == "front" else (PROXY_URL, None)
    _until_channels_to(set(_replicas(url)), ingress_of)  # opened for every replica the ingress's router sees
    models = (BASE, "resident", "second")
    expected = {m: reference("Hello, cluster!", None if m == BASE else m, 16) for m in models}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # many answers on one channel at once
        answers = list(pool.map(lambda m: (m, _stream(url, m)[1]), models * 3))
    assert all(text == expected[m] for m, text in answers), answers


def test_a_replica_killed_mid_stream_ends_it_with_an_error_event_and_the_other_serves(front):
    cluster = front.url
    _until_channels_to(set(_replicas(cluster)), front)
    body = {"model": BASE, "prompt": "Hello, cluster!", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", cluster + "/v1/completions", headers=ADMIN, json=body, timeout=60) as streamed:
        victim = streamed.headers["x-replica"]
        assert victim in _channels(front)  # the stream comes on the channel
        lines = streamed.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#{victim}", namespace="serve"))
        events = _sse(lines)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_unavailable", events[-3:]
    after = [_complete(cluster, BASE) for _ in range(6)]
    assert all(a.status_code == 200 for a in after), [a.text for a in after]
    assert victim not in {a.headers["x-replica"] for a in after}
    deadline = time.monotonic() + 120  # Ray Serve replaces the dead replica
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments["EngineReplica"].replica_states
        if states.get("RUNNING") == 2:
            break
        time.sleep(1)
    assert states.get("RUNNING") == 2, states
    seen: set[str] = set()
    while len(seen) < 2 and time.monotonic() < deadline:  # until the ingress's router knows the new one
        seen.add(_complete(cluster, BASE).headers["x-replica"])
    assert len(seen) == 2 and victim not in seen, (seen, _channels(front))
    _until_channels_to(seen, front)  # the front's ingress opens one to the new replica too
    assert victim not in _channels(front)
