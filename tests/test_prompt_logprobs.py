"""Prompt logprobs (echo, vLLM's prompt_logprobs) computed in the batched forward pass, per adapter, equal to
transformers'/PEFT's log-softmax of the same prompt; and lm-evaluation-harness's loglikelihood requests
against a real server."""


import httpx
import pytest
import torch

from server.engine.sequence import SamplingParams
from tests.conftest import reference_model
from tests.factories import make_engine
from tests.server_harness import openai_client, serve_adapters

TOLERANCE = 1e-4
PROMPTS = [[40, 77, 101, 9, 33, 77, 40], [12, 250, 3, 3, 90], [71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]]


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {"pa": llama_adapters("plp_a", seed=921, r=8, lora_alpha=16),
            "pb": llama_adapters("plp_b", seed=922, r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"])}


def _reference(llama_dir, adapter_dir, prompt: list[int]) -> torch.Tensor:
    """transformers/PEFT log-softmax at every position of `prompt`: (P, vocab)."""
    with torch.inference_mode():
        logits = reference_model(llama_dir, adapter_dir)(input_ids=torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _prompt_scores(reference: torch.Tensor, prompt: list[int]) -> list[float]:
    return reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()


def test_prompt_logprobs_in_a_mixed_batch_equal_transformers(llama_dir, adapter_dirs):
    engine = make_engine(llama_dir)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    solo = [engine.generate([p], greedy, [a])[0].token_ids for p, a in zip(PROMPTS, ["pa", None, "pb"])]
    engine.add_request("running", PROMPTS[0], greedy, "pb")  # a decode in flight when the prefills come
    engine.step()
    jobs = {"a": (PROMPTS[0], "pa", 3), "b": (PROMPTS[1], None, 0), "c": (PROMPTS[2], "pb", 5),
            "free-a": (PROMPTS[0], "pa", None), "free-b": (PROMPTS[1], None, None), "free-c": (PROMPTS[2], "pb", None)}
    for request_id, (prompt, adapter, top) in jobs.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                              prompt_logprobs=top), adapter)
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for request_id, (prompt, adapter, top) in jobs.items():
        tokens = sum((o.token_ids for o in outputs[request_id]), [])
        assert tokens == solo[list(jobs).index(request_id) % 3], "generation is unchanged by prompt logprobs"
        entries = outputs[request_id][0].prompt_logprobs
        assert all(o.prompt_logprobs is None for o in outputs[request_id][1:])
        if top is None:
            assert entries is None
            continue
        reference = _reference(llama_dir, adapter_dirs.get(adapter), prompt)
        assert [e.token_id for e in entries] == prompt[1:]
        assert [e.logprob for e in entries] == pytest.approx(_prompt_scores(reference, prompt), abs=TOLERANCE)
        for e, row in zip(entries, reference):
            assert e.rank == int((row > row[e.token_id]).sum()) + 1
            values, ids = torch.topk(row, top)
            assert [t for t, _ in e.top] == ids.tolist()
            assert [lp for _, lp in e.top] == pytest.approx(values.tolist(), abs=TOLERANCE)


# ---- over HTTP: the openai SDK and lm-evaluation-harness's requests -----------------------------------


@pytest.fixture(scope="module")
def server(llama_dir, adapter_dirs, tmp_path_factory):
    with serve_adapters(llama_dir, adapter_dirs, tmp_path_factory.mktemp("plp_store")) as running:
        yield running


def _loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs for one choice."""
    logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))


@pytest.mark.parametrize("model", ["base", "pa", "pb"])
def test_lm_eval_loglikelihood_requests(server, llama_dir, adapter_dirs, model):
    """What `lm_eval --model local-completions` sends for loglikelihood (tokenized context + continuation,
    echo, logprobs=1, max_tokens=1), scored the way it scores them, equals transformers/PEFT."""
    requests = [(PROMPTS[0][:4], PROMPTS[0][4:]), (PROMPTS[2][:2], PROMPTS[2][2:]), (PROMPTS[1][:3], PROMPTS[1][3:])]
    payload = {"model": model, "prompt": [ctx + cont for ctx, cont in requests], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(server.url + "/v1/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    for choice, (ctx, cont) in zip(choices, requests):
        reference = _reference(llama_dir, adapter_dirs.get(model), ctx + cont)
        expected = sum(_prompt_scores(reference, ctx + cont)[len(ctx) - 1:])
        greedy = reference[len(ctx) - 1:-1].argmax(-1).tolist() == cont
        score, is_greedy = _loglikelihood(choice, len(ctx))
        assert score == pytest.approx(expected, abs=TOLERANCE) and is_greedy == greedy
        assert len(choice["logprobs"]["tokens"]) == len(ctx + cont) + 1  # the prompt, then one generated token
    rolling = httpx.post(server.url + "/v1/completions", json={**payload, "prompt": PROMPTS[2], "max_tokens": 0},
                         timeout=60).json()["choices"][0]
    reference = _reference(llama_dir, adapter_dirs.get(model), PROMPTS[2])
    assert rolling["logprobs"]["token_logprobs"][0] is None
    assert rolling["logprobs"]["token_logprobs"][1:] == pytest.approx(_prompt_scores(reference, PROMPTS[2]),
                                                                     abs=TOLERANCE)
    assert rolling["finish_reason"] == "length" and len(rolling["logprobs"]["tokens"]) == len(PROMPTS[2])


def test_echo_with_the_openai_client(server, llama_dir):
    client = openai_client(server.url)
    text = "Hello, echo!"
    plain = client.completions.create(model="pa", prompt=text, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="pa", prompt=text, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text == text + plain.choices[0].text
    assert "".join(choice.logprobs.tokens[:len(text)]) == text and choice.logprobs.text_offset[:3] == [0, 1, 2]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert echoed.usage.prompt_tokens == len(text.encode()) and echoed.usage.completion_tokens == 4
    only = client.completions.create(model="pa", prompt=text, max_tokens=0, echo=True)
    assert only.choices[0].text == text and only.usage.completion_tokens == 0 and only.choices[0].logprobs is None


def test_vllm_prompt_logprobs(server, llama_dir, adapter_dirs):
    client = openai_client(server.url)
    result = client.completions.create(model="pb", prompt=PROMPTS[1], max_tokens=2, temperature=0,
                                       extra_body={"prompt_logprobs": 2})
    entries = result.choices[0].model_extra["prompt_logprobs"]
    reference = _reference(llama_dir, adapter_dirs["pb"], PROMPTS[1])
    assert entries[0] is None and len(entries) == len(PROMPTS[1])
    for entry, token, row in zip(entries[1:], PROMPTS[1][1:], reference):
        assert entry[str(token)]["logprob"] == pytest.approx(float(row[token]), abs=TOLERANCE)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        assert {int(t) for t in entry} == {token, *torch.topk(row, 2).indices.tolist()}
    assert result.choices[0].text == client.completions.create(model="pb", prompt=PROMPTS[1], max_tokens=2,
                                                                temperature=0).choices[0].text


@pytest.mark.parametrize("kwargs", [dict(echo=True, logprobs=2, max_tokens=5), dict(echo=True, max_tokens=0, n=2),
                                    dict(extra_body={"prompt_logprobs": 1}, logprobs=1, max_tokens=3),
                                    dict(echo=True, logprobs=0, max_tokens=0, extra_body={"prompt_logprobs": 0})])
def test_streamed_echo_adds_up_to_the_whole_response(server, kwargs):
    client = openai_client(server.url)
    prompt = ["Hello, stream!", "Tokens \u00e9\u00e8!"]
    whole = client.completions.create(model="pa", prompt=prompt, temperature=0, **kwargs)
    chunks = list(client.completions.create(model="pa", prompt=prompt, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
        if choice.logprobs is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                _assert_close(sum((getattr(c.logprobs, key) for c in mine), []), getattr(choice.logprobs, key))
        streamed_prompt = [c.model_extra.get("prompt_logprobs") for c in mine]
        _assert_close(streamed_prompt[0], choice.model_extra.get("prompt_logprobs"))
        assert not any(streamed_prompt[1:])


def _assert_close(streamed, whole) -> None:
    """Equal up to float noise: the two runs batch their requests differently."""
    if isinstance(whole, dict):
        assert streamed.keys() == whole.keys()
        for key in whole:
            _assert_close(streamed[key], whole[key])
    elif isinstance(whole, list):
        assert len(streamed) == len(whole)
        for a, b in zip(streamed, whole):
            _assert_close(a, b)
    elif isinstance(whole, float):
        assert streamed == pytest.approx(whole, abs=TOLERANCE)
    else:
        assert streamed == whole


@pytest.mark.parametrize("body, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
])
def test_refusals(server, body, param):
    response = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "hi", **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("model", ["base", "pa"])
def test_lm_evaluation_harness_scores_equal_transformers(server, llama_dir, adapter_dirs, model):
    """lm-evaluation-harness itself (`local-completions`, its LocalCompletionsAPI) scores hand-made
    instances against the running server: loglikelihood and loglikelihood_rolling equal the same scores
    computed with transformers/PEFT."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=model, tokenizer=str(llama_dir),
                             tokenizer_backend="huggingface", max_retries=1, timeout=60)
    pairs = [("the adapter ", "reads"), ("loraserve: ", "many adapters, one base"), ("x", "y")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (score, _) in zip(pairs, scores):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)  # its own split of the text
        ids = context_ids + continuation_ids
        reference = _reference(llama_dir, adapter_dirs.get(model), ids)
        assert score == pytest.approx(sum(_prompt_scores(reference, ids)[len(context_ids) - 1:]), abs=TOLERANCE)

    text = "one base model, many adapters, a batched low-rank path"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # One rolling window: every token scored after lm-eval's prefix token.
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    reference = _reference(llama_dir, adapter_dirs.get(model), ids)
    assert rolling == pytest.approx(sum(_prompt_scores(reference, ids)), abs=TOLERANCE)
