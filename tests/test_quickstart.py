"""README's quickstart, request by request, against a started server on the shipped demo."""

import shutil
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Settings
from tests.server_harness import RunningServer

REPO = Path(__file__).resolve().parent.parent
PROMPT = "hello world\n"
# What the quickstart shows each model answering to PROMPT.
ANSWERS = {"base": "hello world", "reverse": "dlrow olleh", "upper": "HELLO WORLD", "rot13": "uryyb jbeyq"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # `loraserve serve` with its defaults, except a copy of adapters/ so no state lands in the repository.
    store = tmp_path_factory.mktemp("store") / "adapters"
    shutil.copytree(REPO / "adapters", store, ignore=shutil.ignore_patterns(".*"))
    with RunningServer(Settings(model=REPO / "demo" / "base", adapters_dir=store)) as running:
        yield running


def complete(url: str, model: str, prompt: str = PROMPT) -> dict:
    """curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{...}'"""
    body = {"model": model, "prompt": prompt, "max_tokens": 20, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_list_models(server):
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "base"
    assert {"reverse", "rot13", "upper"} <= {m["id"] for m in models[1:]}
    assert all(m["parent"] == "base" for m in models[1:])


@pytest.mark.parametrize("model", ANSWERS)
def test_one_prompt_answered_by_each_model(server, model):
    result = complete(server.url, model)
    assert result["choices"][0]["text"] == ANSWERS[model]
    assert result["choices"][0]["finish_reason"] == "stop"


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    answers = {model: client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
               .choices[0].text for model in ANSWERS}
    assert answers == ANSWERS


def test_upload_an_adapter_and_use_it(server):
    source = REPO / "adapters" / "upper"
    files = {name: (name, (source / name).read_bytes())
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    form = {"name": "shout", "description": "upper-cases the copy"}
    response = httpx.post(server.url + "/v1/adapters", data=form, files=files, timeout=60)
    assert response.status_code == 201, response.text
    meta = response.json()
    assert (meta["id"], meta["rank"], meta["alpha"]) == ("shout@1", 16, 32)
    assert meta["description"] == "upper-cases the copy"
    assert complete(server.url, "shout", "loraserve works\n")["choices"][0]["text"] == "LORASERVE WORKS"
    listed = httpx.get(server.url + "/v1/adapters").json()
    assert "shout" in [a["name"] for a in listed["data"]]


def test_chat_completions(server):
    body = {"model": "upper", "messages": [{"role": "user", "content": "make me loud"}], "temperature": 0}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "MAKE ME LOUD"


def test_small_ab_experiment(server):
    """Create, route with sticky keys, give feedback, read the verdict, promote the winner to an alias."""
    experiment = {"name": "shouty-or-backwards", "status": "running",
                  "variants": [{"name": "A", "adapter": "upper", "weight": 1},
                               {"name": "B", "adapter": "reverse", "weight": 1}]}
    assert httpx.post(server.url + "/v1/experiments", json=experiment).status_code == 201
    for i in range(80):
        body = {"model": "shouty-or-backwards", "prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                "user": f"user-{i}"}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        variant = response.headers["x-experiment-variant"]
        assert response.json()["choices"][0]["text"] == ANSWERS["upper" if variant == "A" else "reverse"]
        score = 1 if variant == "B" or i % 3 == 0 else 0
        feedback = {"request_id": response.json()["id"], "score": score}
        assert httpx.post(server.url + "/v1/feedback", json=feedback).status_code == 201
    results = httpx.get(server.url + "/v1/experiments/shouty-or-backwards/results").json()
    assert results["verdict"]["enough_data"] and results["verdict"]["winner"] == "B"
    stop = {"status": "stopped", "promote": {"alias": "house-style"}}
    assert httpx.patch(server.url + "/v1/experiments/shouty-or-backwards", json=stop).status_code == 200
    assert complete(server.url, "house-style")["choices"][0]["text"] == ANSWERS["reverse"]
