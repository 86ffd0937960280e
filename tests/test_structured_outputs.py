"""Structured outputs (server/engine/grammar.py): JSON schemas, regexes and choices enforced while
sampling, per request in a mixed batch of adapters; free requests in the same steps are token-equal to a
run without the constrained ones; the vocabulary conversion for byte-level and BPE tokenizers; the API
through the `openai` SDK against a real server."""

import json
import random
import re
from typing import Literal

import jsonschema_rs
import openai
import pydantic
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.demo.tokenizer import byte_tokenizer
from server.engine.grammar import GrammarCompiler, GrammarSpec, constrain
from server.engine.sequence import FinishReason, SamplingParams
from server.errors import InvalidRequestError
from tests.factories import make_engine
from tests.server_harness import openai_client, serve_adapters

PROMPTS = [[40, 77, 101, 9, 33], [5, 6, 7, 8], [120, 3, 99, 42, 42, 17], [200, 201]]
EOS = 2


# ---- random nested schemas -----------------------------------------------------------------------

def _leaf(rng: random.Random) -> dict:
    """Bounded leaves, so that a random model finishes within max_tokens."""
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25}  # bounded digits
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    return {"type": "boolean"}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    properties = {}
    for i in range(rng.randint(1, 4)):
        pick = rng.random()
        if depth < 2 and pick < 0.25:
            value = random_schema(rng, depth + 1)
        elif pick < 0.45:
            items = random_schema(rng, depth + 1) if depth < 1 and rng.random() < 0.3 else _leaf(rng)
            value = {"type": "array", "items": items, "maxItems": rng.randint(0, 2 if "properties" in items else 3)}
        else:
            value = _leaf(rng)
        properties[f"{rng.choice('abcxyz')}{i}"] = value
    required = rng.sample(list(properties), rng.randint(0, len(properties)))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _random_walk(compiler: GrammarCompiler, spec: GrammarSpec, vocab: int, seed: int, limit: int = 300) -> list[int]:
    """A "model" whose logits are noise, constrained by the grammar: the tokens it ends with (no EOS)."""
    state, generator, tokens = compiler.compile(spec).start(), torch.Generator().manual_seed(seed), []
    for _ in range(limit):
        scores, errors = constrain(torch.randn(1, vocab, generator=generator), [state])
        assert not errors
        token = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=generator))
        if token == compiler.tokenizer.eos_token:
            return tokens
        assert state.advance(token) is None
        tokens.append(token)
        if state.finished:
            return tokens
    raise AssertionError("the walk did not end")


# ---- vocabulary conversion -------------------------------------------------------------------------

_CORPUS = ['{"name": "alpha", "count": 12, "tags": ["x", "yy"]}', "the quick brown fox jumps over the lazy dog",
           "naïve café — 数字 1234567890", "def f(x):\n    return x * 2\n"] * 50


def _gpt2_style() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _llama_style() -> PreTrainedTokenizerFast:
    """SentencePiece-like BPE as Llama's tokenizer.json has it: '▁' for spaces, merges learnt on a corpus,
    and the byte-fallback tokens <0x00>..<0xFF> in the vocabulary for what the merges lack."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=500))
    learnt = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate(specials + sorted(learnt["vocab"], key=learnt["vocab"].get))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("make", [byte_tokenizer, _gpt2_style, _llama_style], ids=["bytes", "gpt2", "llama"])
def test_vocabulary_conversion_keeps_the_grammar(make):
    tokenizer = make()
    compiler = GrammarCompiler(tokenizer)
    vocab = len(tokenizer) + 5  # logits wider than the tokenizer: the extra ids are never allowed
    rng = random.Random(3)
    for seed in range(6):
        schema = random_schema(rng)
        text = tokenizer.decode(_random_walk(compiler, GrammarSpec("json", json.dumps(schema), "p"), vocab, seed))
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), (schema, text)
    pattern = r"[a-zé数]{2,6}-[0-9]{1,3}( ok)?"
    for seed in range(6):
        text = tokenizer.decode(_random_walk(compiler, GrammarSpec("regex", pattern, "p"), vocab, seed))
        assert re.fullmatch(pattern, text), text
        choices = ["naïve café", "fox", "数字"]
        text = tokenizer.decode(_random_walk(compiler, GrammarSpec("choice", json.dumps(choices), "p"), vocab, seed))
        assert text in choices


def test_invalid_grammars_are_refused_naming_the_parameter():
    compiler = GrammarCompiler(byte_tokenizer())
    for spec in [GrammarSpec("regex", "a(b", "guided_regex"), GrammarSpec("json", '{"type": "frob"}', "guided_json"),
                 GrammarSpec("json", json.dumps({"type": "string", "pattern": "x" * 70_000}), "response_format")]:
        with pytest.raises(InvalidRequestError) as caught:
            compiler.compile(spec)
        assert caught.value.param == spec.param
    spec = GrammarSpec("regex", "[ab]+", "guided_regex")
    assert compiler.compile(spec) is compiler.compile(GrammarSpec("regex", "[ab]+", "guided_regex")), "cached by text"


def test_free_rows_are_untouched():
    tokenizer = byte_tokenizer()
    compiler = GrammarCompiler(tokenizer)
    logits = torch.randn(3, 259)
    state = compiler.compile(GrammarSpec("choice", '["yes", "no"]', "p")).start()
    scores, _ = constrain(logits, [None, state, None])
    assert torch.equal(scores[0], logits[0]) and torch.equal(scores[2], logits[2])
    assert set(torch.isfinite(scores[1]).nonzero()[:, 0].tolist()) == {*tokenizer.encode("y"), *tokenizer.encode("n")}
    assert constrain(logits, [None, None, None])[0] is logits


# ---- the engine: a mixed batch ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_and_adapters(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, max_num_seqs=160, max_batch_tokens=4096)
    adapters = [None]
    for i, (r, seed) in enumerate([(8, 801), (4, 802), (16, 803)]):
        engine.load_adapter(f"so{i}", llama_adapters(f"structured_{i}", seed=seed, r=r, lora_alpha=2 * r))
        adapters.append(f"so{i}")
    return engine, adapters


def _free_requests(adapters: list) -> list[tuple[list[int], SamplingParams, str | None]]:
    return [(PROMPTS[i % 4], SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.8, seed=50 + i),
             adapters[i % len(adapters)]) for i in range(8)]


def test_a_hundred_schemas_in_one_batch_all_validate(engine_and_adapters):
    engine, adapters = engine_and_adapters
    compiler = GrammarCompiler(engine.tokenizer)
    rng = random.Random(11)
    schemas = [random_schema(rng) for _ in range(100)]
    constrained = [(PROMPTS[i % 4], SamplingParams(
        max_tokens=240, temperature=0.0 if i % 3 == 0 else 1.0, top_p=0.95 if i % 5 == 0 else 1.0, seed=i,
        grammar=compiler.compile(GrammarSpec("json", json.dumps(s), "response_format"))), adapters[i % len(adapters)])
        for i, s in enumerate(schemas)]
    free = _free_requests(adapters)
    alone = engine.generate(*map(list, zip(*free)))
    mixed = engine.generate(*map(list, zip(*(constrained + free))))
    for schema, out in zip(schemas, mixed):
        assert out.finish_reason is FinishReason.STOP, (schema, out.text)
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(out.text)), (schema, out.text)
    assert len({json.dumps(s) for s in schemas}) > 90 and len({o.text for o in mixed[:100]}) > 50
    assert [o.token_ids for o in mixed[100:]] == [o.token_ids for o in alone], "free requests are unchanged"


def test_choice_regex_and_length(engine_and_adapters):
    engine, adapters = engine_and_adapters
    compiler = GrammarCompiler(engine.tokenizer)
    choices = ["positive", "negative", "neutral ☺"]
    choice = compiler.compile(GrammarSpec("choice", json.dumps(choices), "guided_choice"))
    pattern = r"([0-9]{3})-[A-Z]{2,4}( x)?"
    regex = compiler.compile(GrammarSpec("regex", pattern, "guided_regex"))
    schema = compiler.compile(GrammarSpec("json", json.dumps(random_schema(random.Random(5))), "guided_json"))
    requests = [(PROMPTS[i % 4], SamplingParams(max_tokens=40, temperature=1.0 if i % 2 else 0.0, seed=i,
                                                grammar=choice if i < 8 else regex), adapters[i % 4]) for i in range(16)]
    requests.append((PROMPTS[0], SamplingParams(max_tokens=3, grammar=schema), adapters[1]))
    outputs = engine.generate(*map(list, zip(*requests)))
    assert all(o.text in choices and o.finish_reason is FinishReason.STOP for o in outputs[:8])
    assert all(re.fullmatch(pattern, o.text) for o in outputs[8:16]), [o.text for o in outputs[8:16]]
    cut = outputs[16]  # max_tokens mid-structure: "length", as vLLM does
    assert cut.finish_reason is FinishReason.LENGTH and len(cut.token_ids) == 3 and cut.text.startswith("{")


def test_a_grammar_that_fails_fails_its_request_alone(engine_and_adapters):
    engine, adapters = engine_and_adapters
    grammar = GrammarCompiler(engine.tokenizer).compile(GrammarSpec("regex", "[a-z]{20}", "guided_regex"))
    engine.add_request("broken", PROMPTS[0], SamplingParams(max_tokens=10, grammar=grammar), adapters[1])
    engine.add_request("free", PROMPTS[1], SamplingParams(max_tokens=10, temperature=0.0), adapters[2])
    engine._requests["broken"].seq.grammar.advance(engine.tokenizer.encode("7")[0])  # the matcher is in error now
    outputs = {out.request_id: out for out in engine.step()}
    assert outputs["broken"].finished and "grammar" in outputs["broken"].error
    assert outputs["free"].error is None and not outputs["free"].finished
    while engine.has_unfinished():
        engine.step()


def test_ignore_eos_with_a_grammar_is_refused():
    grammar = GrammarCompiler(byte_tokenizer()).compile(GrammarSpec("regex", "a", "guided_regex"))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(grammar=grammar, ignore_eos=True)


# ---- the API through the openai SDK ----------------------------------------------------------------

@pytest.fixture(scope="module")
def client(llama_dir, llama_adapters, tmp_path_factory):
    adapters = {"alpha": llama_adapters("structured_0", seed=801, r=8, lora_alpha=16)}
    with serve_adapters(llama_dir, adapters, tmp_path_factory.mktemp("structured_api")) as running:
        yield openai_client(running.url)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"], "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog"]}}}}
MESSAGES = [{"role": "user", "content": "Who are you?"}]


def test_response_format_json_schema_and_json_object(client):
    for model in ("base", "alpha"):
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=200, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(reply.choices[0].message.content))
    text = client.completions.create(model="alpha", prompt="JSON:", max_tokens=200, seed=2, temperature=0.7,
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0]
    if text.finish_reason == "stop":  # any object: a random model may not close it within max_tokens
        assert isinstance(json.loads(text.text), dict)
    else:
        assert text.text.startswith("{")


def test_streamed_structured_output(client):
    stream = client.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=200, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(text))


def test_vllm_guided_extras(client):
    choices = ["alpha", "beta", "gamma"]
    for n, temperature in ((3, 1.0), (1, 0.0)):
        reply = client.completions.create(model="alpha", prompt="pick", max_tokens=20, n=n, temperature=temperature,
                                          seed=4, extra_body={"guided_choice": choices})
        assert all(c.text in choices for c in reply.choices)
    reply = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=20, seed=5,
                                           extra_body={"guided_regex": r"[0-9]{2}:[0-9]{2}"})
    assert re.fullmatch(r"[0-9]{2}:[0-9]{2}", reply.choices[0].message.content)
    reply = client.completions.create(model="base", prompt="x", max_tokens=200, seed=6,
                                      extra_body={"guided_json": json.dumps(PERSON)})
    assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(reply.choices[0].text))


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog"]
    name: str = pydantic.Field(max_length=6)


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    pets: list[Pet] = pydantic.Field(max_length=2)


def test_openai_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(model="alpha", messages=MESSAGES, max_tokens=200, seed=7,
                                          response_format=Owner)
    owner = reply.choices[0].message.parsed
    assert isinstance(owner, Owner) and len(owner.pets) <= 2


def test_langchain_with_structured_output(client):
    """LangChain's `with_structured_output` (JSON schema) returns a parsed object."""
    import langchain_openai  # a test dependency (pyproject's test extras): no skip

    model = langchain_openai.ChatOpenAI(base_url=str(client.base_url), api_key="unused", model="alpha", max_tokens=200,
                                        temperature=0.0, max_retries=0)
    owner = model.with_structured_output(Owner, method="json_schema").invoke("Who owns which pets?")
    assert isinstance(owner, Owner) and len(owner.pets) <= 2


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ({"guided_choice": ["a"], "ignore_eos": True}, ""),
])
def test_invalid_structured_outputs_are_refused(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x", max_tokens=5, extra_body=extra)
    assert (caught.value.body["param"] or "").startswith(param), caught.value.body
