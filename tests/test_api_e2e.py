"""End to end: a real uvicorn server on loopback, the official openai client and plain HTTP."""

import asyncio
import re
import shutil
import time

import httpx
import openai
import pytest

from server.config import Settings
from server.engine.sequence import SamplingParams
from tests.factories import make_engine
from tests.server_harness import RunningServer

ADAPTERS = {f"task{i}": dict(seed=300 + i, r=[4, 8, 16, 8][i % 4], lora_alpha=16,
                             target_modules=[["q_proj", "v_proj"], ["o_proj", "down_proj"]][i % 2])
            for i in range(8)}
PROMPT = "Hello, adapters!"


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(name, **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="module")
def server(llama_dir, adapter_dirs, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for name in list(ADAPTERS)[:6]:  # hand-placed: discovered at start
        shutil.copytree(adapter_dirs[name], store / name)
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=64 * 1024**2, max_loras=4, served_model_name="tiny-llama",
                        lora=[f"task6={adapter_dirs['task6']}", f"task7={adapter_dirs['task7']}"])
    with RunningServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def reference(llama_dir, adapter_dirs):
    """What the engine gives directly for a text prompt (greedy), per adapter."""
    engine = make_engine(llama_dir)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)

    def run(prompt: str, adapter: str | None, max_tokens: int):
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        return engine.generate([prompt], params, [adapter])[0]
    return run


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_health_ready_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    models = client.models.list().data
    assert models[0].id == "tiny-llama"
    names = [m.id for m in models[1:]]
    assert sorted(names) == sorted(ADAPTERS)
    assert all(m.model_extra["parent"] == "tiny-llama" for m in models[1:])


@pytest.mark.parametrize("model", ["tiny-llama", "task0", "task3", "task7"])
def test_completion_equals_the_engine(client, reference, model):
    adapter = None if model == "tiny-llama" else model
    result = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.choices[0].text == reference(PROMPT, adapter, 12).text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 12 and result.usage.prompt_tokens == len(PROMPT.encode())
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == result.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", ["tiny-llama", "task1", "task6"])
def test_chat_equals_the_engine(server, client, reference, model):
    adapter = None if model == "tiny-llama" else model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = server.state.tokenizer.apply_chat_template(
        messages, chat_template=__import__("server.api.chat", fromlist=["x"]).FALLBACK_TEMPLATE,
        add_generation_prompt=True, tokenize=False)
    result = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert result.choices[0].message.content == reference(prompt, adapter, 10).text
    assert result.choices[0].message.role == "assistant"
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == result.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == 10


def test_n_seed_logprobs_and_stop(client):
    result = client.completions.create(model="task2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3,
                                       logprobs=2)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({c.text for c in result.choices}) > 1
    again = client.completions.create(model="task2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3,
                                      logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    assert len(result.choices[0].logprobs.token_logprobs) == 8
    # a dict keyed by token text: two byte tokens may both decode to U+FFFD and share a key
    assert all(1 <= len(top) <= 2 for top in result.choices[0].logprobs.top_logprobs)
    full = client.completions.create(model="task2", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    cut = client.completions.create(model="task2", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_over_8_adapters(server, reference):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    jobs = [(list(ADAPTERS)[i % 8], f"{PROMPT} #{i}") for i in range(32)]

    async def one(model, prompt):
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        return await asyncio.gather(*(one(m, p) for m, p in jobs))

    results = asyncio.run(main())
    for (model, prompt), (text, reason) in zip(jobs, results):
        expected = reference(prompt, model, 10)
        assert (text, reason) == (expected.text, expected.finish_reason.value)


def test_request_id_is_returned(server):
    response = httpx.get(server.url + "/health", headers={"X-Request-ID": "trace-me-42"})
    assert response.headers["x-request-id"] == "trace-me-42"
    assert len(httpx.get(server.url + "/health").headers["x-request-id"]) == 32


def test_errors_have_the_openai_shape(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = httpx.post(server.url + "/v1/completions", json={"model": "task0", "prompt": "x", "temperature": 9})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    response = httpx.post(server.url + "/v1/completions", json={"model": "task0"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(server.url + "/v1/completions", json={"model": "task0", "prompt": "x" * 300, "max_tokens": 10})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'loraserve_request_errors_total{adapter="task0@1",status="400"}' in metrics
    assert 'loraserve_request_errors_total{adapter="unresolved",status="404"}' in metrics


def test_metrics_carry_adapter_labels(server, client):
    client.completions.create(model="task4", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert 'loraserve_requests_total{adapter="task4@1",endpoint="completions",finish_reason="length"}' in text
    assert 'loraserve_output_tokens_total{adapter="task4@1"}' in text
    assert "loraserve_time_to_first_token_seconds_bucket" in text
    for gauge in ("loraserve_queue_depth", "loraserve_running_batch_size", "loraserve_kv_cache_usage_ratio",
                  "loraserve_device_adapter_loads_total", "loraserve_device_adapter_moves_total",
                  "loraserve_engine_step_seconds_total"):
        assert gauge in text
    steps = float(re.search(r"^loraserve_engine_steps_total (\S+)$", text, re.M).group(1))
    assert steps >= 3, "three tokens took at least three forward passes"


def test_client_disconnect_frees_the_batch_slot_and_cache(server):
    engine = server.state.engine
    generated_before = engine.snapshot.tokens_generated
    body = {"model": "task5", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert engine.snapshot.running == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and engine.snapshot.running:
        time.sleep(0.02)
    snapshot = engine.snapshot
    assert snapshot.running == 0 and snapshot.kv_free_blocks == snapshot.kv_blocks
    assert snapshot.tokens_generated - generated_before < 100, "the request ran on after its client left"
