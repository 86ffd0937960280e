"""The OpenAI surface as real clients use it, against a real server with the `openai` SDK: what clients send
with neutral values is accepted and changes nothing; anything else that is not implemented is refused
with 400 naming the parameter, never accepted and ignored."""

import shutil

import httpx
import openai
import pytest

from server.config import Settings
from tests.server_harness import RunningServer

PROMPT = "Hello, adapters!"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(llama_dir, llama_adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("surface")
    shutil.copytree(llama_adapters("surface_a", seed=701, r=8, lora_alpha=16), store / "alpha")
    shutil.copytree(llama_adapters("surface_b", seed=702, r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
                    store / "beta")
    settings = Settings(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu",
                        kv_cache_memory=32 * 1024**2, served_model_name="base")
    with RunningServer(settings) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _refused(call, param: str, says: str = "") -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert caught.value.status_code == 400 and (error["param"] or "").startswith(param), error
    assert says in error["message"], error


NEUTRAL_CHAT = dict(frequency_penalty=0, presence_penalty=0, logit_bias={}, n=1, logprobs=False,
                    response_format={"type": "text"}, tools=[], tool_choice="none", parallel_tool_calls=False,
                    service_tier="auto", store=False, metadata={"team": "eval"}, modalities=["text"],
                    user="someone")


def test_neutral_chat_parameters_change_nothing(client):
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    neutral = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0,
                                             **NEUTRAL_CHAT)
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    streamed = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}, **NEUTRAL_CHAT)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content


def test_neutral_completion_parameters_change_nothing(client):
    plain = client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0)
    neutral = client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0, best_of=1,
                                        frequency_penalty=0, presence_penalty=0, logit_bias={}, suffix="", echo=False,
                                        extra_body={"service_tier": "default", "store": False})
    assert neutral.choices[0].text == plain.choices[0].text


def test_earlier_assistant_messages_round_trip(client):
    """What the SDK gives back (message.model_dump(): nulls for tools, refusal, audio) may be sent again."""
    first = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4, temperature=0)
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude={"annotations"}),
               {"role": "user", "content": "again", "name": "someone"}]
    client.chat.completions.create(model="base", messages=history, max_tokens=4, temperature=0)


@pytest.mark.parametrize("field", ["audio", "prediction", "reasoning_effort", "web_search_options", "no_such_thing"])
def test_unknown_chat_parameters_are_refused_by_name(client, field):
    _refused(lambda: client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2,
                                                    extra_body={field: {"x": 1}}), field)


@pytest.mark.parametrize("field", ["guided_json", "response_format", "tools", "no_such_thing"])
def test_unknown_completion_parameters_are_refused_by_name(client, field):
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2,
                                               extra_body={field: {"type": "json_object"}}), field)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("kwargs, param, says", [
    (dict(tools=[TOOL]), "tools", "tool calling is not supported yet"),
    (dict(tool_choice="required"), "tool_choice", "tool calling is not supported yet"),
    (dict(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice", "not supported yet"),
    (dict(response_format={"type": "json_object"}), "response_format", "structured outputs"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), "response_format",
     "structured outputs"),
    (dict(store=True), "store", "not supported yet"),
    (dict(service_tier="flex"), "service_tier", "not supported yet"),
    (dict(modalities=["text", "audio"]), "modalities", "not supported yet"),
    (dict(stream_options={"include_usage": True, "continuous_usage_stats": True}, stream=True),
     "stream_options.continuous_usage_stats", ""),
])
def test_what_is_not_implemented_is_refused(client, kwargs, param, says):
    _refused(lambda: client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, **kwargs),
             param, says)


def test_tool_messages_and_image_parts_are_refused(client):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _refused(lambda: client.chat.completions.create(
        model="alpha", max_tokens=2, messages=[*MESSAGES, {"role": "assistant", "tool_calls": [call]}]),
        "messages.1.tool_calls", "tool calling")
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    _refused(lambda: client.chat.completions.create(
        model="alpha", max_tokens=2, messages=[{"role": "user", "content": image}]), "messages.0.content")


def test_suffix_is_refused(client):
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, suffix="end"), "suffix",
             "not supported yet")


def test_plain_http_error_shape(server):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"model": "alpha", "messages": MESSAGES, "functions": [{"name": "f"}]})
    assert response.status_code == 400
    assert response.json()["error"] | {"message": None} == {
        "message": None, "type": "invalid_request_error", "param": "functions", "code": "invalid_parameter"}
