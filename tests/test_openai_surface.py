"""The OpenAI surface as real clients use it, against a real server with the `openai` SDK: what clients send
with neutral values is accepted and changes nothing; anything else that is not implemented is refused
with 400 naming the parameter, never accepted and ignored."""


import httpx
import openai
import pytest

from server.api.chat import chat_prompt
from server.api.schemas import ChatMessage
from server.config import Settings
from server.engine.sequence import SamplingParams
from tests.factories import make_engine
from tests.server_harness import RunningServer, openai_client, serve_adapters

PROMPT = "Hello, adapters!"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(llama_dir, llama_adapters, tmp_path_factory):
    adapters = {"alpha": llama_adapters("surface_a", seed=701, r=8, lora_alpha=16),
                "beta": llama_adapters("surface_b", seed=702, r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"])}
    with serve_adapters(llama_dir, adapters, tmp_path_factory.mktemp("surface")) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai_client(server.url)


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
                                              stream=True, **NEUTRAL_CHAT,
                                              stream_options={"include_usage": True, "include_obfuscation": False})
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


@pytest.mark.parametrize("field", ["tools", "guided_grammar", "no_such_thing"])
def test_unknown_completion_parameters_are_refused_by_name(client, field):
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2,
                                               extra_body={field: {"type": "json_object"}}), field)


@pytest.mark.parametrize("kwargs, param, says", [
    (dict(tool_choice="required"), "tool_choice", "needs tools"),  # tools themselves: tests/test_tool_calling.py
    (dict(extra_body={"functions": [{"name": "f"}]}), "functions", "not supported yet"),
    (dict(store=True), "store", "not supported yet"),
    (dict(service_tier="flex"), "service_tier", "not supported yet"),
    (dict(modalities=["text", "audio"]), "modalities", "not supported yet"),
    (dict(stream_options={"include_usage": True, "continuous_usage_stats": True}, stream=True),
     "stream_options.continuous_usage_stats", ""),
])
def test_what_is_not_implemented_is_refused(client, kwargs, param, says):
    _refused(lambda: client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, **kwargs),
             param, says)


def test_misplaced_tool_fields_and_image_parts_are_refused(client):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _refused(lambda: client.chat.completions.create(
        model="alpha", max_tokens=2, messages=[*MESSAGES, {"role": "user", "content": "x", "tool_calls": [call]}]),
        "messages.1", "assistant messages")
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    _refused(lambda: client.chat.completions.create(
        model="alpha", max_tokens=2, messages=[{"role": "user", "content": image}]), "messages.0.content")


def test_top_logprobs_without_logprobs_is_refused(client):
    _refused(lambda: client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, top_logprobs=3),
             "top_logprobs", "needs logprobs")
    client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, top_logprobs=0)  # neutral


def test_suffix_is_refused(client):
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, suffix="end"), "suffix",
             "not supported yet")


def test_plain_http_error_shape(server):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"model": "alpha", "messages": MESSAGES, "functions": [{"name": "f"}]})
    assert response.status_code == 400
    assert response.json()["error"] | {"message": None} == {
        "message": None, "type": "invalid_request_error", "param": "functions", "code": "invalid_parameter"}


# ---- every sampling parameter through the SDK, equal to the engine run directly -------------------------


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters):
    engine = make_engine(llama_dir)
    engine.load_adapter("alpha", llama_adapters("surface_a", seed=701, r=8, lora_alpha=16))
    return engine


def _direct(engine, prompt: str, adapter: str | None, **params) -> str:
    return engine.generate([prompt], SamplingParams(**params), [adapter])[0].text


CONTROLS = [  # (openai SDK arguments, the engine's SamplingParams fields)
    (dict(logit_bias={"112": 100, "101": -100}), dict(logit_bias=((112, 100.0), (101, -100.0)))),
    (dict(frequency_penalty=2.0, presence_penalty=1.0), dict(frequency_penalty=2.0, presence_penalty=1.0)),
    (dict(extra_body={"repetition_penalty": 1.9}), dict(repetition_penalty=1.9)),
    (dict(temperature=1.0, seed=11, extra_body={"min_p": 0.3}), dict(temperature=1.0, seed=11, min_p=0.3)),
    (dict(temperature=1.0, seed=12, extra_body={"top_k": 3}), dict(temperature=1.0, seed=12, top_k=3)),
    (dict(temperature=1.0, seed=13, top_p=0.4), dict(temperature=1.0, seed=13, top_p=0.4)),
    (dict(extra_body={"min_tokens": 6, "ignore_eos": False}), dict(min_tokens=6)),
]


@pytest.mark.parametrize("sdk, direct", CONTROLS)
def test_each_control_through_the_sdk_equals_the_engine(client, engine, sdk, direct):
    sdk = {"temperature": 0, **sdk}
    direct = {"temperature": 0, **direct}
    text = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, **sdk).choices[0].text
    assert text == _direct(engine, PROMPT, "alpha", max_tokens=10, **direct)
    chat = client.chat.completions.create(model="base", messages=MESSAGES, max_completion_tokens=10, **sdk)
    prompt = chat_prompt(engine.tokenizer, [ChatMessage(**m) for m in MESSAGES])
    assert chat.choices[0].message.content == _direct(engine, prompt, None, max_tokens=10, **direct)


def test_controls_change_the_output(client):
    plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    for sdk, _ in CONTROLS[:3]:
        assert client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0,
                                         **sdk).choices[0].text != plain, sdk


def test_best_of_returns_the_most_likely(client):
    result = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=2,
                                       best_of=5, logprobs=0)
    pool = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=5,
                                     logprobs=0)
    ranked = sorted(pool.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in result.choices] == [c.text for c in ranked[:2]]
    assert result.usage.completion_tokens == pool.usage.completion_tokens
    without = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=2,
                                        best_of=5)
    assert [c.text for c in without.choices] == [c.text for c in result.choices] and without.choices[0].logprobs is None
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, n=3, best_of=2), "best_of", "must be >=")
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, best_of=2, stream=True), "best_of",
             "cannot be streamed")


@pytest.mark.parametrize("kwargs, param", [
    (dict(logit_bias={"7": 101}), "logit_bias"), (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"999999": 1}), "logit_bias"), (dict(logit_bias={"\u00b2": 1}), "logit_bias"),
    (dict(logit_bias={"9" * 5000: 1}), "logit_bias"), (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=-2.1), "presence_penalty"), (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_p": 1.2}), "min_p"), (dict(extra_body={"min_tokens": -1}), "min_tokens"),
])
def test_bad_control_values_are_refused(client, kwargs, param):
    _refused(lambda: client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, **kwargs), param)


# ---- models.retrieve, /tokenize and /detokenize, the stop token in logprobs ----------------------------


def test_chat_without_max_tokens_gets_what_the_context_leaves(client):
    """The default (256) is cut to the context left after the prompt (256 positions here), as vLLM does; an
    explicit max_tokens that does not fit is still refused."""
    long = [{"role": "user", "content": "x" * 200}]
    out = client.chat.completions.create(model="alpha", messages=long, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 256
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="alpha", messages=long, max_tokens=100)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_models_retrieve(client):
    assert client.models.retrieve("base").id == "base"
    alpha = client.models.retrieve("alpha")
    assert alpha.id == "alpha" and alpha.model_extra["parent"] == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize(server, prefix):
    tokenizer = server.state.tokenizer
    answer = httpx.post(f"{server.url}{prefix}/tokenize", json={"model": "alpha", "prompt": PROMPT,
                                                               "return_token_strs": True}).json()
    assert answer["tokens"] == tokenizer.encode(PROMPT) and answer["count"] == len(answer["tokens"])
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    back = httpx.post(f"{server.url}{prefix}/detokenize", json={"model": "alpha", "tokens": answer["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    chat = httpx.post(f"{server.url}{prefix}/tokenize", json={"model": "base", "messages": MESSAGES}).json()
    expected = chat_prompt(tokenizer, [ChatMessage(**m) for m in MESSAGES])
    assert chat["tokens"] == tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, None),
    ("/tokenize", {"model": "base", "prompt": "x", "messages": MESSAGES}, 400, None),
    ("/tokenize", {"model": "base", "prompt": "x", "extra": 1}, 400, "extra"),
    ("/detokenize", {"model": "base", "tokens": [1, 10**9]}, 400, "tokens"),
    ("/v1/detokenize", {"model": "nope", "tokens": [1]}, 404, None),
])
def test_tokenize_refusals(server, path, body, status, param):
    response = httpx.post(server.url + path, json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_tokenize_needs_a_key_when_auth_is_on(llama_dir, tmp_path):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path, dtype="float32", device="cpu",
                        kv_cache_memory=8 * 1024**2, served_model_name="base", admin_key="admin-secret")
    with RunningServer(settings) as running:
        for path in ("/tokenize", "/v1/tokenize"):
            assert httpx.post(running.url + path, json={"model": "base", "prompt": "x"}).status_code == 401
            malformed = httpx.post(running.url + path, content=b"{not json", headers={"content-type": "application/json"})
            assert malformed.status_code == 401, "no key, no body read: the key is checked first"
            ok = httpx.post(running.url + path, json={"model": "base", "prompt": "x"},
                            headers={"Authorization": "Bearer admin-secret"})
            assert ok.status_code == 200 and ok.json()["count"] == 1


def test_the_stop_token_is_neither_in_the_text_nor_in_the_logprobs(client):
    eos = {"2": 100}  # the tiny model's EOS (id 2) first
    chat = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logit_bias=eos, logprobs=True, top_logprobs=2)
    choice = chat.choices[0]
    assert (choice.message.content, choice.logprobs.content, choice.finish_reason) == ("", [], "stop")
    assert chat.usage.completion_tokens == 1
    text = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=eos,
                                     logprobs=1).choices[0]
    assert (text.text, text.logprobs.tokens, text.finish_reason) == ("", [], "stop")
    past = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=eos,
                                     extra_body={"ignore_eos": True})
    assert (past.usage.completion_tokens, past.choices[0].finish_reason) == (4, "length")
