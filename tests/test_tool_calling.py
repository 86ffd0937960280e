"""Tool calling (server/api/tools.py): the Hermes-style format parsed whole and in pieces alike; tools in the
chat template or in the fallback preamble; forced calls (required, a named tool) enforced by the grammar
engine in a mixed batch of adapters, free requests in the same steps token-equal to a run without them;
the API through the `openai` SDK (and LangChain's bind_tools) against a real server."""

import json
import random
from pathlib import Path

import jsonschema_rs
import openai
import pytest

from server.api import tools
from server.api.chat import chat_prompt
from server.api.schemas import ChatMessage
from server.engine.grammar import GrammarCompiler
from server.engine.sequence import FinishReason, SamplingParams
from tests.factories import build_model, byte_tokenizer, llama_config, make_adapter, make_engine, save_model
from tests.server_harness import openai_client, serve_adapters

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
    "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
    "a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 9}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["terms"], "properties": {
    "terms": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}},
    "exact": {"type": "boolean"}}}
FUNCTIONS = [{"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
             {"name": "add", "parameters": ADD}, {"name": "search", "parameters": SEARCH}]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
SCHEMAS = {f["name"]: f["parameters"] for f in FUNCTIONS}
NAMES = set(SCHEMAS)
PROMPTS = [[40, 77, 101, 9, 33], [5, 6, 7, 8], [120, 3, 99, 42, 42, 17], [200, 201]]


def _valid(name: str, arguments: str) -> bool:
    return name in SCHEMAS and jsonschema_rs.validator_for(SCHEMAS[name]).is_valid(json.loads(arguments))


# ---- the format ------------------------------------------------------------------------------------

def test_calls_and_content_are_parsed():
    text = ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>')
    content, calls = tools.parse(text, NAMES)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert len({c.id for c in calls}) == 2
    for text in ["plain text  ", "<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>",
                 "<tool_call>{not json}</tool_call>", "<tool_call>\n{\"name\": \"add\", \"arguments\": 3}\n</tool_call>",
                 "<tool_call>\n{\"name\": \"add\", \"arguments\": {}", "a < b <tool_"]:
        assert tools.parse(text, NAMES) == (text, []), "not a call: the text as it is"


def _reassembled(events: list) -> tuple[str, list[tuple[str, str, str]]]:
    """Content and calls (id, name, arguments) put back together from a parser's events, as a client does."""
    content, calls = "", {}
    for kind, value in events:
        if kind == "content":
            content += value
        elif kind == "start":
            assert value[0] not in calls
            calls[value[0]] = [value[1], value[2], ""]
        else:
            calls[value[0]][2] += value[1]
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("eager", [False, True])
def test_fed_in_pieces_equals_whole(eager):
    rng = random.Random(1)
    pieces = ["hi ", "<tool_call>\n", '{"name": "add", "arguments": {"a": 1, "b": 2}}', "\n</tool_call>", "\n  ",
              "<tool_call>{bad}</tool_call>", " then ", "<tool_call>\n", '{"name": "search", "arguments": {"terms": ["}"]}}',
              "\n</tool_call>", "\n", "<tool_ca", "ll> tail"]
    forced = [tools.call_text("add", {"a": -4, "b": 9}), tools.call_text("search", {"terms": ["}", "\\\"é"]}),
              tools.call_text("get_weather", {"city": "{}", "unit": "celsius"})]
    for _ in range(80):
        if eager:  # what a forced choice's grammar writes: calls, one per line
            text = "\n".join(rng.choice(forced) for _ in range(rng.randint(1, 4)))
        else:
            text = "".join(rng.sample(pieces, rng.randint(1, len(pieces))))
        whole_content, whole_calls = tools.parse(text, NAMES)
        parser, events, cut = tools.ToolCallParser(NAMES, eager), [], 0
        while cut < len(text):
            step = rng.randint(1, 7)
            events += parser.feed(text[cut:cut + step])
            cut += step
        content, calls = _reassembled(events + parser.finish())
        assert (content or None if calls else content) == whole_content, text
        assert [(name, arguments) for _, name, arguments in calls] == [(c.name, c.arguments) for c in whole_calls]
        assert [call_id for call_id, _, _ in calls] == [c.id for c in parser.calls]


def test_forced_calls_stream_their_arguments_in_pieces():
    parser = tools.ToolCallParser(NAMES, eager=True)
    text = tools.call_text("search", {"terms": ["a}b", "c"], "exact": True})
    events = [event for i in range(0, len(text), 3) for event in parser.feed(text[i:i + 3])] + parser.finish()
    assert [kind for kind, _ in events[:2]] == ["start", "arguments"] and len(events) > 5
    assert _reassembled(events)[1] == [(parser.calls[0].id, "search", '{"terms": ["a}b", "c"], "exact": true}')]


# ---- the prompt ------------------------------------------------------------------------------------

HERMES_LIKE = (  # the shape of Hermes/Qwen templates: tools listed in the system turn, calls as tagged JSON
    "{% if tools %}<|system|>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}\n{% endfor %}<|assistant|>\n"
)
HISTORY = [ChatMessage(role="user", content="weather in Oslo?"),
           ChatMessage(role="assistant", content=None, tool_calls=[{
               "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]),
           ChatMessage(role="tool", content="-3", tool_call_id="call_1")]


def _tokenizer(chat_template: str | None):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = chat_template
    return tokenizer


def test_a_template_with_tools_gets_them_and_the_history():
    prompt = chat_prompt(_tokenizer(HERMES_LIKE), HISTORY, TOOLS)
    assert all(json.dumps(tool) in prompt for tool in TOOLS), "the tools, as the template writes them"
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>' in prompt, \
        "an earlier call's arguments go to the template as a dict"
    assert "-3[call_1]" in prompt and "You may call" not in prompt


def test_a_template_without_tools_gets_the_preamble():
    prompt = chat_prompt(_tokenizer(None), [ChatMessage(role="system", content="Be brief."), *HISTORY], TOOLS)
    assert prompt.startswith("<|system|>\nYou may call these tools") and "Be brief." in prompt
    assert all(f'"name": "{name}"' in prompt for name in NAMES)
    assert tools.call_text("get_weather", {"city": "Oslo", "unit": "celsius"}) in prompt, "earlier calls in the format"
    assert chat_prompt(_tokenizer(None), HISTORY[:1]) == "<|user|>\nweather in Oslo?\n<|assistant|>\n", "no tools"


# ---- the engine: forced calls in a mixed batch -------------------------------------------------------

@pytest.fixture(scope="module")
def long_llama(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The tiny llama with a context long enough for tools in the prompt (the byte tokenizer: a token a
    byte), and two adapters on it."""
    root = tmp_path_factory.mktemp("tools_llama")
    base = save_model(build_model(llama_config(max_position_embeddings=4096)), root / "base")
    return base, [make_adapter(base, root / f"tools_{i}", seed=900 + i, r=r, lora_alpha=2 * r)
                  for i, r in enumerate([8, 4])]


@pytest.fixture(scope="module")
def engine_and_adapters(long_llama):
    base, adapter_dirs = long_llama
    engine = make_engine(base, max_num_seqs=64, max_batch_tokens=8192)
    for i, directory in enumerate(adapter_dirs):
        engine.load_adapter(f"tc{i}", directory)
    return engine, [None, "tc0", "tc1"]


def test_forced_calls_in_a_mixed_batch_always_validate(engine_and_adapters):
    engine, adapters = engine_and_adapters
    compiler = GrammarCompiler(engine.tokenizer)
    choices = [(FUNCTIONS, True), (FUNCTIONS, False), *(([f], False) for f in FUNCTIONS), (FUNCTIONS[1:], True)]
    forced = [(PROMPTS[i % 4], SamplingParams(max_tokens=1500, temperature=0.0 if i % 3 == 0 else 1.0, seed=i,
                                              grammar=compiler.compile(tools.grammar_spec(*choices[i % len(choices)]))),
               adapters[i % len(adapters)]) for i in range(24)]
    free = [(PROMPTS[i % 4], SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.8, seed=60 + i),
             adapters[i % len(adapters)]) for i in range(6)]
    alone = engine.generate(*map(list, zip(*free)))
    mixed = engine.generate(*map(list, zip(*(forced + free))))
    for i, out in enumerate(mixed[:24]):
        functions, parallel = choices[i % len(choices)]
        content, calls = tools.parse(out.text, NAMES)
        assert out.finish_reason is FinishReason.STOP and content is None and calls, out.text
        assert parallel or len(calls) == 1
        assert all(c.name in {f["name"] for f in functions} and _valid(c.name, c.arguments) for c in calls), out.text
    assert len({c.name for out in mixed[:24] for c in tools.parse(out.text, NAMES)[1]}) == 3
    assert [o.token_ids for o in mixed[24:]] == [o.token_ids for o in alone], "free requests are unchanged"


# ---- the API through the openai SDK ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(long_llama, tmp_path_factory):
    base, adapter_dirs = long_llama
    with serve_adapters(base, {"alpha": adapter_dirs[0]}, tmp_path_factory.mktemp("tools_api")) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai_client(server.url)


MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "add"}}


@pytest.mark.parametrize("model", ["base", "alpha"])
def test_required_and_named_give_valid_calls(client, model):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=1000, n=3, temperature=1.0, seed=3)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert all(c.type == "function" and c.id and _valid(c.function.name, c.function.arguments)
                   for c in choice.message.tool_calls)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED,
                                           parallel_tool_calls=False, max_tokens=200, seed=4)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "add" and _valid("add", call.function.arguments)


def _streamed_calls(stream, pieces: list | None = None) -> tuple[str, list[tuple[str, str]], str]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = delta.id or entry["id"]
                entry["name"] += (delta.function.name or "") if delta.function else ""
                entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
                if pieces is not None and delta.function and delta.function.arguments:
                    pieces.append(delta.function.arguments)
            finish = choice.finish_reason or finish
    assert all(entry["id"] for entry in calls.values())
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], finish


def test_streamed_deltas_reassemble_into_the_same_calls(client):
    for choice in ("required", NAMED):
        kwargs = dict(model="alpha", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=1000,
                      temperature=0.0, seed=5)
        whole = client.chat.completions.create(**kwargs).choices[0]
        pieces = []
        content, calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True), pieces)
        assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert content == "" and finish == whole.finish_reason == "tool_calls"
        assert len(pieces) > 2 * len(calls), "a forced call's arguments stream as they are written"


CALL_REGEX = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Oslo|Rome)", "unit": "celsius"\}\}\n</tool_call>'


def test_auto_parses_a_call_in_the_format_and_leaves_text_alone(client):
    """A regex makes the random model write a call: auto reads it, whole or streamed; none leaves it as text."""
    kwargs = dict(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=6,
                  extra_body={"guided_regex": CALL_REGEX})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking."
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and _valid("get_weather", call.function.arguments)
    content, calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    assert (content, calls, finish) == ("Checking.", [("get_weather", call.function.arguments)], "tool_calls")
    text = client.chat.completions.create(**kwargs, tool_choice="none").choices[0]
    assert text.finish_reason == "stop" and text.message.tool_calls is None
    assert text.message.content.startswith("Checking.\n<tool_call>")
    free = client.chat.completions.create(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=16, seed=7).choices[0]
    assert free.message.tool_calls is None and free.finish_reason in ("stop", "length")


def test_none_gives_text(client):
    reply = client.chat.completions.create(model="alpha", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                           max_tokens=12, temperature=0.0).choices[0]
    assert reply.message.tool_calls is None and isinstance(reply.message.content, str)
    assert reply.finish_reason in ("stop", "length")


def test_follow_up_messages_with_tool_results_are_accepted(client):
    first = client.chat.completions.create(model="alpha", messages=MESSAGES, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=200, seed=8).choices[0].message
    history = [*MESSAGES, first.model_dump(exclude={"annotations"}),
               *({"role": "tool", "tool_call_id": call.id, "content": "-3 degrees"} for call in first.tool_calls)]
    reply = client.chat.completions.create(model="alpha", messages=history, tools=TOOLS, max_tokens=8, seed=9)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    more = client.chat.completions.create(model="alpha", messages=history, tools=TOOLS, tool_choice="required",
                                          max_tokens=1000, seed=10).choices[0]
    assert more.finish_reason == "tool_calls" and all(_valid(c.function.name, c.function.arguments)
                                                      for c in more.message.tool_calls)


def _tool(**function) -> dict:
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize("kwargs, param", [
    (dict(tools=[_tool(name="has space")]), "tools.0.function.name"),
    (dict(tools=[_tool(name="x" * 65)]), "tools.0.function.name"),
    (dict(tools=[TOOLS[0], _tool(parameters={"type": "string"})]), "tools.1.function.parameters"),
    (dict(tools=[TOOLS[0], _tool(parameters={"type": "object", "properties": {"a": {"type": "frob"}}})]),
     "tools.1.function.parameters"),
    (dict(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameter": {}}}]), "tools.0.function.parameter"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
])
def test_bad_tool_definitions_are_refused_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4, **kwargs)
    assert (caught.value.body["param"] or "").startswith(param), caught.value.body


def test_langchain_bind_tools(server):
    import langchain_openai  # a test dependency (pyproject's test extras): no skip
    from pydantic import BaseModel, Field

    class Add(BaseModel):
        """Add two small numbers."""
        a: int = Field(ge=0, le=9)
        b: int = Field(ge=0, le=9)

    model = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="alpha",
                                        max_tokens=200, temperature=0.0, max_retries=0)
    answer = model.bind_tools([Add], tool_choice="Add").invoke("add 2 and 3")
    [call] = answer.tool_calls
    assert call["name"] == "Add" and Add(**call["args"])
