"""A/B experiments over HTTP on a real server: definitions and refusals, sticky routing with the variant
header, feedback rules, lifecycle answers, restart persistence, and an experiment run to a promotion."""

import shutil

import httpx
import openai
import pytest

from server.config import Settings
from tests.server_harness import RunningServer

PROMPT = "experiment!"


@pytest.fixture(scope="module")
def sources(llama_adapters):
    return {
        "helper-a": llama_adapters("exp_a", seed=501, r=8, lora_alpha=16),
        "helper-b": llama_adapters("exp_b", seed=502, r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
    }


@pytest.fixture
def store(sources, tmp_path):
    store = tmp_path / "store"
    for name, directory in sources.items():  # hand-placed: discovered at start as helper-a@1, helper-b@1
        shutil.copytree(directory, store / name)
    return store


def _settings(llama_dir, store) -> Settings:
    return Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2,
                    served_model_name="base")


def _complete(url: str, model: str, key: str | None = None, **extra) -> httpx.Response:
    headers = {"X-Experiment-Key": key} if key is not None else {}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)


def _text(url: str, model: str) -> str:
    response = _complete(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _create(url: str, name: str, variants: list[dict], **extra) -> httpx.Response:
    return httpx.post(url + "/v1/experiments", json={"name": name, "variants": variants, **extra})


def _patch(url: str, name: str, **body) -> httpx.Response:
    return httpx.patch(f"{url}/v1/experiments/{name}", json=body)


def _feedback(url: str, request_id: str, score) -> httpx.Response:
    return httpx.post(url + "/v1/feedback", json={"request_id": request_id, "score": score})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


TWO_WAY = [{"name": "A", "adapter": "helper-a", "weight": 1}, {"name": "B", "adapter": "base", "weight": 1}]


def test_definitions_are_checked_and_pinned(llama_dir, store):
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        assert httpx.put(url + "/v1/aliases/prod", json={"target": "helper-b"}).status_code == 200
        for taken in ("helper-a", "base", "prod"):  # one namespace for every `model` string
            assert _error(_create(url, taken, TWO_WAY), 409)["code"] == "name_conflict"
        assert _error(_create(url, "../x", TWO_WAY), 400)["code"] == "invalid_name"
        assert _error(_create(url, "x", TWO_WAY[:1]), 400)["param"] == "variants"
        unknown = [*TWO_WAY[:1], {"name": "B", "adapter": "nope", "weight": 1}]
        assert _error(_create(url, "x", unknown), 404)["code"] == "model_not_found"
        bad = [{"name": "A", "adapter": "helper-a", "weight": 0}, {"name": "A", "adapter": "base", "weight": 0}]
        message = _error(_create(url, "x", bad), 400)["message"]
        assert "unique" in message and "positive" in message  # every problem at once
        assert _error(_create(url, "x", TWO_WAY, status="paused"), 400)["code"] == "invalid_experiment"
        assert _error(_create(url, "x", TWO_WAY, wieght=3), 400)["code"] == "invalid_parameter"

        variants = [{"name": "A", "adapter": "helper-a", "weight": 3},
                    {"name": "B", "adapter": "prod", "weight": 1, "control": True}]
        created = _create(url, "tone", variants)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["status"] == "draft" and body["started"] is None and body["assignment_key"] == "user"
        assert [(v["adapter"], v["share"], v["control"]) for v in body["variants"]] == [
            ("helper-a@1", 0.75, False), ("helper-b@1", 0.25, True)]
        assert _error(_create(url, "tone", TWO_WAY), 409)["code"] == "name_conflict"
        assert [e["name"] for e in httpx.get(url + "/v1/experiments").json()["data"]] == ["tone"]
        assert httpx.get(url + "/v1/experiments/tone").json() == body
        assert _error(httpx.get(url + "/v1/experiments/nope"), 404)["code"] == "experiment_not_found"
        assert httpx.delete(url + "/v1/experiments/tone").json() == {"deleted": "tone"}
        assert _error(httpx.get(url + "/v1/experiments/tone"), 404)["code"] == "experiment_not_found"
        assert _error(_complete(url, "tone", "k"), 404)["code"] == "model_not_found"


def test_routing_feedback_and_lifecycle(llama_dir, store):
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        direct = {"A": _text(url, "helper-a"), "B": _text(url, "base")}
        assert direct["A"] != direct["B"]
        assert _create(url, "tone", TWO_WAY).status_code == 201
        draft = _error(_complete(url, "tone", "k"), 409)
        assert draft["code"] == "experiment_not_running" and "draft" in draft["message"]
        started = _patch(url, "tone", status="running").json()
        assert started["status"] == "running" and started["started"] is not None

        seen = {}
        for i in range(12):
            response = _complete(url, "tone", key=f"key-{i}")
            assert response.status_code == 200, response.text
            variant = response.headers["x-experiment-variant"]
            assert response.json()["choices"][0]["text"] == direct[variant]  # served by that variant's model
            assert response.json()["model"] == "tone"
            seen[f"key-{i}"] = variant
        assert set(seen.values()) == {"A", "B"}
        again = [_complete(url, "tone", key=k).headers["x-experiment-variant"] for k in seen]
        assert again == list(seen.values())  # sticky
        # the `user` field outranks the header
        by_user = _complete(url, "tone", key="key-0", user="key-1").headers["x-experiment-variant"]
        assert by_user == seen["key-1"]
        with httpx.stream("POST", url + "/v1/completions", timeout=60, headers={"X-Experiment-Key": "key-2"},
                          json={"model": "tone", "prompt": PROMPT, "max_tokens": 4, "stream": True}) as streamed:
            assert streamed.headers["x-experiment-variant"] == seen["key-2"]
            assert "[DONE]" in streamed.read().decode()
        chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tone", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "key-3"})
        assert chat.headers["x-experiment-variant"] == seen["key-3"]

        # feedback: by response id (either endpoint) or bare request id; once; known ids only
        first = _complete(url, "tone", key="key-4")
        recorded = _feedback(url, first.json()["id"], True)
        assert recorded.status_code == 201, recorded.text
        assert recorded.json() == {"request_id": first.headers["x-request-id"], "experiment": "tone",
                                   "variant": seen["key-4"], "score": 1.0}
        assert _error(_feedback(url, first.headers["x-request-id"], 0), 409)["code"] == "duplicate_feedback"
        assert _feedback(url, chat.json()["id"], 0.25).status_code == 201
        assert _feedback(url, chat.headers["x-request-id"], 1).status_code == 409
        assert _error(_feedback(url, "cmpl-unknown", 1), 404)["code"] == "request_not_found"
        assert _error(_feedback(url, first.json()["id"], "great"), 400)["param"].startswith("score")
        not_a_number = httpx.post(url + "/v1/feedback", content=b'{"request_id": "x", "score": NaN}',
                                  headers={"content-type": "application/json"})
        assert _error(not_a_number, 400)["param"].startswith("score")
        plain = _complete(url, "base")  # not an experiment's request: nothing to score
        assert _error(_feedback(url, plain.json()["id"], 1), 404)["code"] == "request_not_found"
        reused = httpx.post(url + "/v1/completions", headers={"X-Request-ID": first.headers["x-request-id"]},
                            json={"model": "tone", "prompt": PROMPT, "max_tokens": 2})
        assert _error(reused, 409)["code"] == "duplicate_request_id"

        metrics = httpx.get(url + "/metrics").text
        assert f'loraserve_experiment_requests_total{{experiment="tone",outcome="ok",variant="{seen["key-4"]}"}}' in metrics
        assert 'loraserve_experiment_feedback_score_count{experiment="tone"' in metrics
        assert 'loraserve_experiment_time_to_first_token_seconds_bucket{experiment="tone"' in metrics

        results = httpx.get(url + "/v1/experiments/tone/results").json()
        assert sum(v["requests"] for v in results["variants"]) == 12 * 2 + 4  # user, stream, chat, first; the reused id never ran
        assert results["score_type"] == "numeric" and not results["verdict"]["enough_data"]
        assert "not enough data" in results["verdict"]["message"]
        assert _error(httpx.post(url + "/v1/experiments/tone/promote", json={"alias": "x"}), 409)["code"] == "no_winner"
        promote_base = httpx.post(url + "/v1/experiments/tone/promote", json={"alias": "x", "variant": "B"})
        assert _error(promote_base, 409)["code"] == "not_promotable"

        paused = _patch(url, "tone", status="paused")
        assert paused.json()["status"] == "paused"
        message = _error(_complete(url, "tone", "key-0"), 409)["message"]
        assert "paused" in message and "running" in message
        assert _patch(url, "tone", weights={"A": 3}).json()["variants"][0]["weight"] == 3
        assert _error(_patch(url, "tone", weights={"C": 1}), 400)["code"] == "invalid_experiment"
        stopped = _patch(url, "tone", status="stopped").json()
        assert stopped["status"] == "stopped" and stopped["stopped"] is not None
        stopped_error = _error(_complete(url, "tone", "key-0"), 409)
        assert stopped_error["code"] == "experiment_not_running" and "stopped" in stopped_error["message"]
        assert _error(_patch(url, "tone", status="running"), 409)["code"] == "invalid_transition"
        assert _error(_patch(url, "tone", weights={"A": 1}), 409)["code"] == "invalid_transition"


def test_errors_count_against_their_variant(llama_dir, store):
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        only_a = [{"name": "A", "adapter": "helper-a", "weight": 1}, {"name": "B", "adapter": "base", "weight": 0}]
        assert _create(url, "fragile", only_a, status="running").status_code == 201
        too_long = _complete(url, "fragile", "k", prompt="x" * 300, max_tokens=10)
        assert _error(too_long, 400)["code"] == "context_length_exceeded"
        assert httpx.delete(url + "/v1/adapters/helper-a").status_code == 200
        assert _error(_complete(url, "fragile", "k"), 404)["code"] == "model_not_found"
        a, b = httpx.get(url + "/v1/experiments/fragile/results").json()["variants"]
        assert (a["requests"], a["errors"], b["requests"]) == (2, 2, 0)
        assert a["errors_by_code"] == {"context_length_exceeded": 1, "model_not_found": 1}
        assert a["latency_seconds"] == {"ttft": None, "total": None}
        metrics = httpx.get(url + "/metrics").text
        assert 'loraserve_experiment_requests_total{experiment="fragile",outcome="model_not_found",variant="A"} 1.0' in metrics


def test_experiments_survive_a_restart(llama_dir, store):
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        assert _create(url, "sticky", TWO_WAY, status="running", assignment_key="header").status_code == 201
        before = {}
        for i in range(6):
            response = _complete(url, "sticky", key=f"k{i}")
            before[f"k{i}"] = response.headers["x-experiment-variant"]
            assert _feedback(url, response.json()["id"], i % 2).status_code == 201
        definition = httpx.get(url + "/v1/experiments/sticky").json()
        results = httpx.get(url + "/v1/experiments/sticky/results").json()

    with RunningServer(_settings(llama_dir, store)) as restarted:
        url = restarted.url
        assert httpx.get(url + "/v1/experiments/sticky").json() == definition
        assert httpx.get(url + "/v1/experiments/sticky/results").json() == results
        assert sum(v["feedback"]["count"] for v in results["variants"]) == 6
        assert {k: _complete(url, "sticky", key=k).headers["x-experiment-variant"] for k in before} == before


def test_an_experiment_runs_to_a_promoted_winner(llama_dir, store):
    """Two adapters, 40 users through the openai client, users like B's answers more: the results name B,
    stopping promotes B to an alias, and the alias serves B's adapter."""
    with RunningServer(_settings(llama_dir, store)) as server:
        url = server.url
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        variants = [{"name": "A", "adapter": "helper-a", "weight": 1}, {"name": "B", "adapter": "helper-b", "weight": 1}]
        created = _create(url, "support", variants, status="running", min_samples=10)
        assert created.status_code == 201, created.text

        for i in range(40):
            raw = client.completions.with_raw_response.create(model="support", prompt=PROMPT, max_tokens=4,
                                                              temperature=0, user=f"user-{i}")
            variant, completion = raw.headers["x-experiment-variant"], raw.parse()
            liked = i % 10 != 0 if variant == "B" else i % 4 == 0  # ~90% against ~25%
            assert _feedback(url, completion.id, liked).status_code == 201

        results = httpx.get(url + "/v1/experiments/support/results").json()
        a, b = results["variants"]
        assert a["control"] and a["requests"] + b["requests"] == 40
        assert min(a["feedback"]["count"], b["feedback"]["count"]) >= 10
        assert a["output_tokens"] + b["output_tokens"] == 40 * 4 and a["errors"] == b["errors"] == 0
        assert set(b["latency_seconds"]["ttft"]) == {"p50", "p90", "p99"}
        assert b["latency_seconds"]["total"]["p50"] >= b["latency_seconds"]["ttft"]["p50"]
        low, high = b["feedback"]["ci95"]
        assert low < b["feedback"]["mean"] < high
        assert results["score_type"] == "binary" and b["comparison"]["test"] == "two-proportion z-test"
        assert b["comparison"]["significant"] and b["comparison"]["p_value"] < 0.05
        assert results["verdict"] == {"enough_data": True, "winner": "B", "message": results["verdict"]["message"]}
        assert results["verdict"]["message"].startswith("B beats the control A")

        ended = _patch(url, "support", status="stopped", promote={"alias": "support-best"})
        assert ended.status_code == 200, ended.text
        promotion = ended.json()["promotion"]
        assert (promotion["alias"], promotion["variant"], promotion["adapter"]) == ("support-best", "B", "helper-b@1")
        assert httpx.get(url + "/v1/aliases").json()["data"][0]["target"] == "helper-b@1"
        assert _text(url, "support-best") == _text(url, "helper-b@1")
        assert "support-best" in _error(_complete(url, "support", "user-1"), 409)["message"]
