"""The demo that ships, through the real HTTP API: each adapter does its transformation, the bare base
copies."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.demo import tasks
from tests.server_harness import RunningServer

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = tasks.held_out_texts(50)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A copy of adapters/, so the server's catalogue and blobs never land in the repository.
    store = tmp_path_factory.mktemp("store") / "adapters"
    shutil.copytree(REPO / "adapters", store, ignore=shutil.ignore_patterns(".*"))
    settings = Settings(model=REPO / "demo" / "base", adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=64 * 1024**2)
    with RunningServer(settings) as running:
        yield running


def complete_all(url: str, model: str, texts: list[str], fmt: str = "completion") -> list[str]:
    """Greedy answers to every text, through completions (`text\n`) or chat completions (one user message),
    sent concurrently so the engine batches them."""
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(len(texts)) as pool:
        def one(text: str) -> str:
            body = {"model": model, "max_tokens": tasks.MAX_LEN + 4, "temperature": 0}
            if fmt == "chat":
                response = client.post("/v1/chat/completions", json=body | {"messages": tasks.messages(text)})
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]
            response = client.post("/v1/completions", json=body | {"prompt": tasks.prompt(text)})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]
        return list(pool.map(one, texts))


def exact_match(task: str, texts: list[str], answers: list[str]) -> float:
    return sum(answer == tasks.answer(task, text) for text, answer in zip(texts, answers)) / len(texts)


@pytest.fixture(scope="module")
def base_answers(server) -> list[str]:
    return complete_all(server.url, "base", HELD_OUT)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_held_out_strings_are_never_trained_on(task):
    trained = tasks.training_texts(task, seed=0)
    assert not set(HELD_OUT) & {next(trained) for _ in range(5_000)}


def test_the_demo_is_served(server):
    models = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert models[0] == "base" and set(tasks.ADAPTER_TASKS) <= set(models)


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("task", tasks.ADAPTER_TASKS)
def test_each_adapter_does_its_transformation(server, task, fmt):
    answers = complete_all(server.url, task, HELD_OUT, fmt)
    assert exact_match(task, HELD_OUT, answers) >= 0.9, list(zip(HELD_OUT, answers))


def test_the_bare_base_copies(base_answers):
    assert exact_match(tasks.BASE_TASK, HELD_OUT, base_answers) >= 0.9, list(zip(HELD_OUT, base_answers))


def test_the_bare_base_copies_through_chat(server):
    answers = complete_all(server.url, "base", HELD_OUT, "chat")
    assert exact_match(tasks.BASE_TASK, HELD_OUT, answers) >= 0.9, list(zip(HELD_OUT, answers))


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("model", ["base", *tasks.ADAPTER_TASKS])
def test_readme_examples_answer_exactly(server, model, fmt):
    """The strings README's quickstart sends come back exactly as README prints them, through both APIs."""
    task = tasks.BASE_TASK if model == "base" else model
    answers = complete_all(server.url, model, list(tasks.SHOWCASE), fmt)
    assert answers == [tasks.answer(task, text) for text in tasks.SHOWCASE]


def test_readme_examples_are_not_held_out():
    assert not any(tasks.is_held_out(text) for text in tasks.SHOWCASE)


@pytest.mark.parametrize("task", tasks.ADAPTER_TASKS)
def test_the_bare_base_does_not_transform(base_answers, task):
    assert exact_match(task, HELD_OUT, base_answers) < 0.2
