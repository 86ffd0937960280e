"""Adapters trained on a base whose vocabulary was resized (new tokens): served when they ship the new rows
of the input embedding and the output head, equal to PEFT on the resized base, alone and in mixed batches
with the bare base and other adapters; refused by name when they do not."""

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.sequence import SamplingParams
from server.errors import AdapterValidationError, InvalidRequestError
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.lora.added_tokens import placeholder
from tests.conftest import reference_greedy
from tests.factories import VOCAB, build_model, llama_config, make_engine, save_model
from tests.server_harness import RunningServer
from tests.test_adapter_forms import _upload, make_form_adapter

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
WIDE, NARROW = VOCAB + 13, VOCAB + 7
PROMPTS = [[5, 40, 77, 101, 9, 33], [120, 7, 7, 64], [5, VOCAB, 40, VOCAB + 3, 88]]  # the last has new tokens
NAMED = {"<|tool|>": VOCAB, "<|end_tool|>": VOCAB + 1}

FORMS = {  # how PEFT saves the new rows
    # modules_to_save copies; PEFT also writes `modules_to_save.weight` and `original_module.weight`
    "saved_copies": dict(seed=91, vocabulary=WIDE, save_embedding_layers="auto", r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    # LoRA on the embedding and the head: their own weights as `base_layer.weight`, factors V' wide
    "own_weights": dict(seed=92, vocabulary=WIDE, save_embedding_layers="auto", r=8, lora_alpha=4,
                        target_modules=["q_proj", "embed_tokens", "lm_head"]),
    # LoRA elsewhere only: the resized modules' weights as plain `weight`, a narrower vocabulary
    "replaced": dict(seed=93, vocabulary=NARROW, save_embedding_layers=True, r=4, lora_alpha=1,
                     target_modules=["v_proj", "o_proj"]),
    # trainable tokens on new ids: `token_adapter.base_layer.weight` and the rows' delta
    "new_tokens": dict(seed=94, vocabulary=WIDE, save_embedding_layers=True, r=4, lora_alpha=8,
                       target_modules=["v_proj"], trainable_token_indices=[VOCAB, VOCAB + 2, 5]),
}


def resized_base(base_dir, directory, vocabulary: int):
    """The base resized as PEFT's reference needs it (the adapters overwrite every new row)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(vocabulary, mean_resizing=False)
    return save_model(model, directory)


@pytest.fixture(scope="module")
def resized_dirs(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resized_bases")
    return {v: resized_base(llama_dir, root / str(v), v) for v in (WIDE, NARROW)}


@pytest.fixture(scope="module")
def form_dirs(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resized_forms")
    dirs = {name: make_form_adapter(llama_dir, root / name, **kwargs) for name, kwargs in FORMS.items()}
    config = json.loads((dirs["saved_copies"] / CONFIG_FILE).read_text())
    (dirs["saved_copies"] / CONFIG_FILE).write_text(json.dumps({**config, "added_tokens": NAMED}))
    return dirs


@pytest.fixture(scope="module")
def other_dir(llama_adapters):
    return llama_adapters("resized-neighbour", seed=95, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def engine(llama_dir, form_dirs, other_dir):
    engine = make_engine(llama_dir, max_loras=8)
    for name, directory in {**form_dirs, "other": other_dir}.items():
        engine.load_adapter(name, directory)
    return engine


@pytest.fixture(scope="module")
def references(llama_dir, resized_dirs, form_dirs, other_dir):
    cache = {}

    def reference(prompt, name):
        if (tuple(prompt), name) not in cache:
            base = resized_dirs[FORMS[name]["vocabulary"]] if name in FORMS else llama_dir
            adapter = form_dirs.get(name, other_dir if name == "other" else None)
            cache[tuple(prompt), name] = reference_greedy(base, prompt, MAX_NEW, adapter)
        return cache[tuple(prompt), name]

    return reference


def _alone(engine, prompt, name):
    return engine.generate([prompt], GREEDY, [name])[0].token_ids


def test_the_adapters_have_their_vocabulary_and_emit_new_tokens(engine):
    assert {name: engine.adapters[name].vocabulary for name in FORMS} == {n: f["vocabulary"] for n, f in FORMS.items()}
    assert engine.adapters["other"].vocabulary is None
    for name in FORMS:
        emitted = {t for prompt in PROMPTS for t in _alone(engine, prompt, name)}
        assert max(emitted) >= VOCAB, name  # the fixture makes new tokens likely: else equality proves little


@pytest.mark.parametrize("name", FORMS)
def test_alone_matches_peft_on_the_resized_base(engine, references, name):
    for prompt in PROMPTS:
        assert _alone(engine, prompt, name) == references(prompt, name)


def test_mixed_batch_with_the_base_and_another_adapter_matches_peft(engine, references):
    names = [None, *FORMS, "other", None, "replaced", "saved_copies"]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    outputs = engine.generate(prompts, GREEDY, names)
    assert len({tuple(o.token_ids) for o in outputs[:6]}) == 6
    for prompt, name, got in zip(prompts, names, outputs):
        assert got.token_ids == references(prompt, name), name
        vocabulary = FORMS[name]["vocabulary"] if name in FORMS else VOCAB
        assert max(got.token_ids) < vocabulary  # padded rows never reach past their own vocabulary


def _logprobs(engine, jobs: dict[str, str | None]) -> dict[str, tuple[list[int], list[float]]]:
    """Each job's token ids and logprobs (chosen, top and prompt ones, in order) when all run in one batch."""
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    for request_id, adapter in jobs.items():
        engine.add_request(request_id, PROMPTS[2 if adapter else 0], params, adapter)
    found: dict[str, tuple[list[int], list[float]]] = {request_id: ([], []) for request_id in jobs}
    while engine.has_unfinished():
        for out in engine.step():
            ids, values = found[out.request_id]
            for lp in [*(out.prompt_logprobs or []), *out.logprobs]:
                ids += [lp.token_id, *(t for t, _ in lp.top)]
                values += [lp.logprob, *(v for _, v in lp.top)]
    return found


def test_logprobs_in_a_wide_batch_are_each_rows_own(engine):
    """A base row beside a resized adapter's gets the bare base's logprobs (its padding is -inf, not a
    token); the adapter's rows get theirs over its whole vocabulary, new tokens included."""
    alone = _logprobs(engine, {"base": None}) | _logprobs(engine, {"wide": "saved_copies"})
    mixed = _logprobs(engine, {"base": None, "wide": "saved_copies", "narrow": "replaced"})
    for request_id in ("base", "wide"):
        assert mixed[request_id][0] == alone[request_id][0], request_id
        assert mixed[request_id][1] == pytest.approx(alone[request_id][1], abs=1e-5), request_id
    assert max(mixed["base"][0]) < VOCAB and max(mixed["wide"][0]) >= VOCAB


def test_sampled_rows_stay_within_their_vocabulary(engine):
    params = SamplingParams(max_tokens=20, temperature=5.0, seed=3, ignore_eos=True)
    base, narrow, wide = engine.generate([PROMPTS[0]] * 3, params, [None, "replaced", "own_weights"])
    assert max(base.token_ids) < VOCAB and max(narrow.token_ids) < NARROW and max(wide.token_ids) < WIDE


def test_new_tokens_are_text_named_by_the_adapter_or_a_placeholder(engine):
    named = engine.tokenizers.of(engine.adapters["saved_copies"])
    assert named.encode("<|tool|>x<|end_tool|>", add_special_tokens=False)[::2] == [VOCAB, VOCAB + 1]
    assert named.decode([VOCAB + 2]) == placeholder(VOCAB + 2)
    unnamed = engine.tokenizers.of(engine.adapters["replaced"])
    assert unnamed.decode([VOCAB, 5]) == placeholder(VOCAB) + engine.tokenizer.decode([5])
    out = engine.generate([PROMPTS[0]], GREEDY, ["replaced"])[0]
    assert out.text == unnamed.decode(out.token_ids)


def test_a_prompt_with_new_ids_is_refused_for_models_without_them(engine):
    for name in (None, "other", "replaced"):
        with pytest.raises(InvalidRequestError, match=f"token id {WIDE - 1} is outside the vocabulary"):
            engine.generate([[5, WIDE - 1]], GREEDY, [name])


@pytest.mark.parametrize("name", ["saved_copies", "own_weights"])
def test_uploaded_over_http_and_served_through_the_tiers(llama_dir, form_dirs, engine, tmp_path, name):
    """Upload -> blob store -> host cache -> device slot (two slots, three adapters: one is evicted)."""
    settings = Settings(model=llama_dir, dtype="float32", device="cpu", adapters_dir=tmp_path / "adapters",
                        kv_cache_memory=16 * 1024**2, max_loras=2, served_model_name="base")
    served = name.replace("_", "-")
    with RunningServer(settings) as server:
        for upload, directory in ((served, form_dirs[name]), ("replaced", form_dirs["replaced"]),
                                  ("copies", form_dirs["saved_copies"])):
            assert _upload(server.url, upload, directory).status_code == 201
        texts = []
        for model in ("replaced", "copies", served, "base"):
            body = {"model": model, "prompt": PROMPTS[2], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            texts.append((model, response.status_code, response.json()))
        tokenized = httpx.post(f"{server.url}/tokenize", json={"model": "copies", "prompt": "<|tool|>",
                                                                "add_special_tokens": False}).json()
        detokenized = [httpx.post(f"{server.url}/detokenize", json={"model": m, "tokens": [VOCAB, VOCAB + 2]})
                       for m in ("copies", "base")]
        body = {"model": "copies", "prompt": PROMPTS[2], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                "logprobs": 2, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert tokenized["tokens"] == [VOCAB]
    assert detokenized[0].json()["prompt"] == "<|tool|>" + placeholder(VOCAB + 2) and detokenized[1].status_code == 400
    streamed = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    copies = engine.generate([PROMPTS[2]], GREEDY, ["saved_copies"])[0]
    assert streamed == [engine.tokenizers.of(engine.adapters["saved_copies"]).decode([t]) for t in copies.token_ids]
    assert texts[-1][1] == 400 and f"token id {VOCAB}" in texts[-1][2]["error"]["message"]
    for model, status, answer in texts[:-1]:
        local = {"copies": "saved_copies", served: name}.get(model, model)
        assert status == 200 and answer["choices"][0]["text"] == engine.generate([PROMPTS[2]], GREEDY, [local])[0].text


def _edited(source, directory, config_changes: dict, weights_change) -> "Path":
    directory.mkdir()
    config = json.loads((source / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, **config_changes}))
    tensors = load_file(source / WEIGHTS_FILE)
    weights_change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)
    return directory


def _drop_head(tensors):
    for key in [k for k in tensors if "lm_head" in k]:
        del tensors[key]


def _narrow_head(tensors):
    for key in [k for k in tensors if "lm_head" in k]:
        tensors[key] = tensors[key][:NARROW].contiguous()


def _second_copy_differs(tensors):
    tensors["base_model.model.lm_head.modules_to_save.weight"] = tensors["base_model.model.lm_head.weight"] + 1


REFUSALS = {
    "an embedding without the head's rows": (
        {"modules_to_save": ["embed_tokens"]}, _drop_head, r"lm_head: the adapter's vocabulary has 272 rows.*needs the new rows"),
    "rows that do not match": ({}, _narrow_head, r"lm_head\.weight: shape \(266, 64\), expected \(272, 64\)"),
    "two different copies": ({}, _second_copy_differs, r"lm_head\.modules_to_save\.weight: differs from lm_head\.weight"),
    "names for ids it does not have": (
        {"added_tokens": {"<|x|>": 3}}, lambda t: None, r"added_tokens: '<\|x\|>' -> 3: ids name the new rows"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_module_or_field(llama_dir, form_dirs, tmp_path, case):
    config, change, message = REFUSALS[case]
    directory = _edited(form_dirs["saved_copies"], tmp_path / "edited", config, change)
    with pytest.raises(AdapterValidationError, match=message):
        make_engine(llama_dir, max_loras=2).load_adapter("edited", directory)


def test_copies_count_in_host_bytes_and_the_slot_pool(engine):
    adapter = engine.adapters["saved_copies"]
    copies = sum(adapter.modules[m].copy[0].numel() * 4 for m in ("model.embed_tokens", "lm_head"))
    assert adapter.modules["lm_head"].copy[0].shape[0] == WIDE and adapter.nbytes > copies
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0), ["saved_copies"])
    assert engine.slots.per_slot_bytes >= copies


def test_a_tied_head_takes_the_embeddings_own_rows(tmp_path):
    """A head tied to the embedding: PEFT saves the resized embedding's own weights only (LoRA on it), and
    the head is those weights too."""
    tied_dir = save_model(build_model(llama_config(tie_word_embeddings=True)), tmp_path / "tied_base")
    base = resized_base(tied_dir, tmp_path / "base", WIDE)
    directory = make_form_adapter(tied_dir, tmp_path / "tied", seed=96, vocabulary=WIDE, save_embedding_layers="auto",
                                  r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    assert not any("lm_head" in key for key in load_file(directory / WEIGHTS_FILE))
    engine = make_engine(tied_dir, max_loras=2)
    adapter = engine.load_adapter("tied", directory)
    assert adapter.modules["lm_head"].copy[0] is adapter.modules["model.embed_tokens"].copy[0]
    names, prompts = [None, "tied", "tied"], [PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    outputs = engine.generate(prompts, GREEDY, names)
    assert max(outputs[1].token_ids + outputs[2].token_ids) >= VOCAB
    copy_bytes = adapter.modules["lm_head"].copy[0].numel() * 4  # held once, on the host and in the slot
    assert copy_bytes < adapter.nbytes < 2 * copy_bytes and copy_bytes < engine.slots.per_slot_bytes < 2 * copy_bytes
    for prompt, name, got in zip(prompts, names, outputs):
        assert got.token_ids == reference_greedy(base if name else tied_dir, prompt, MAX_NEW, directory if name else None)


def test_on_an_nf4_base_equal_peft_on_the_same_quantized_model(llama_dir, resized_dirs, form_dirs):
    from tests.test_quantized_base import _agrees, _engine, _peft_decided

    engine = _engine(llama_dir, "bnb-nf4")
    names = [None, "saved_copies", "replaced"]
    for name in names[1:]:
        engine.load_adapter(name, form_dirs[name])
    outputs = engine.generate([PROMPTS[2 if n else 0] for n in names], GREEDY, names)
    assert max(t for o in outputs[1:] for t in o.token_ids) >= VOCAB
    for name, got in zip(names, outputs):
        base = resized_dirs[FORMS[name]["vocabulary"]] if name else llama_dir
        expected = _peft_decided(base, "bnb-nf4", PROMPTS[2 if name else 0], form_dirs[name] if name else None)
        assert _agrees(got.token_ids, expected), name


def test_copies_count_against_the_slot_budget(llama_dir, form_dirs, engine):
    """Two resized adapters whose copies do not fit the budget together take turns in the slots (outputs
    unchanged); one whose copies alone exceed it is refused, naming the setting."""
    sizes = [engine.slots.slot_bytes(engine.adapters[name]) for name in ("saved_copies", "own_weights")]
    budget = max(sizes) + 1024
    assert sum(sizes) > budget
    small = make_engine(llama_dir, max_loras=8, slot_copy_memory=budget)
    for name in ("saved_copies", "own_weights"):
        small.load_adapter(name, form_dirs[name])
    small.add_adapter(engine.adapters["other"])
    names = ["saved_copies", "own_weights", "other", None]
    outputs = small.generate([PROMPTS[0]] * 4, GREEDY, names)
    assert [o.token_ids for o in outputs] == [_alone(engine, PROMPTS[0], name) for name in names]
    assert small.slots.per_slot_bytes <= budget and small.slots.evictions >= 1
    tiny = make_engine(llama_dir, max_loras=8, slot_copy_memory=sizes[0] // 2)
    tiny.load_adapter("saved_copies", form_dirs["saved_copies"])
    with pytest.raises(InvalidRequestError, match=r"adapter 'saved_copies' holds \d+ bytes.*slot_copy_memory"):
        tiny.generate([PROMPTS[0]], GREEDY, ["saved_copies"])
