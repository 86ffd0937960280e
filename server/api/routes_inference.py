"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions (with tools: server/api/tools.py),
/v1/models."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from transformers import PreTrainedTokenizerBase

from server.api import openai_format as fmt
from server.api import tools
from server.api.chat import chat_prompt
from server.api.auth import caller
from server.api.errors import ApiError, domain_error_status, error_body
from server.api.inference import ChoiceOutput, Target
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.api.state import AppState, app_state
from server.engine.grammar import Grammar, GrammarSpec, compiler_for
from server.engine.sampler import TokenLogprobs
from server.engine.sequence import SamplingParams
from server.errors import InferenceFailedError, UnknownAdapterError
from server.experiments.model import Caller

router = APIRouter(tags=["inference"])

EXPERIMENT_KEY_HEADER = "x-experiment-key"
EXPERIMENT_VARIANT_HEADER = "X-Experiment-Variant"


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    token_chars: int = 0  # the length of the token strings streamed so far: where the next text_offset starts
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those served from the prefix cache
    completion_tokens: int = 0


async def _grammar(state: AppState, body) -> Grammar | None:
    """The request's structured output, compiled on a worker thread (cached by its text); 400 naming the
    parameter when it does not compile."""
    spec = body.grammar_spec()
    if spec is None:
        return None
    return await asyncio.to_thread(lambda: compiler_for(state.tokenizer).compile(spec))


def _sampling(body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
              grammar: Grammar | None = None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_tokens=body.min_tokens, logit_bias=body.bias(),
                              repetition_penalty=body.repetition_penalty, min_p=body.min_p,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              presence_penalty=body.presence_penalty or 0.0, grammar=grammar)
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_parameter") from None


async def _collect(outputs: AsyncIterator[ChoiceOutput], count: int) -> list[_Choice]:
    choices = [_Choice() for _ in range(count)]
    async for item in outputs:
        choice, out = choices[item.index], item.output
        choice.text += out.text
        choice.logprobs += out.logprobs
        choice.prompt_logprobs = choice.prompt_logprobs or out.prompt_logprobs
        choice.prompt_tokens, choice.completion_tokens = out.prompt_tokens, out.completion_tokens
        choice.cached_tokens = out.cached_tokens
        if out.finished:
            choice.finish_reason = out.finish_reason.value
    return choices


def _caller(request: Request, user: str | None) -> Caller:
    return Caller(request.state.request_id, user, request.headers.get(EXPERIMENT_KEY_HEADER), caller(request).tenant)


def _variant_header(target: Target) -> dict[str, str]:
    return {EXPERIMENT_VARIANT_HEADER: target.experiment.variant} if target.experiment is not None else {}


def _admit(request: Request, state: AppState, tokens: int) -> Callable[[], None]:
    """Count the request against its tenant's limits (429 if over); returns the release for its end."""
    who = caller(request)
    return (lambda: None) if who.is_admin else state.limits.admit(who.tenant, tokens)


async def _released(chunks: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """The stream's chunks; a request the engine failed mid-stream ends with an error event (the status
    line went out with the first chunk) and [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except InferenceFailedError as exc:
        status, code = domain_error_status(exc)
        yield fmt.sse(error_body(status, str(exc), code=code))
        yield fmt.sse("[DONE]")
    finally:
        release()


def _streaming(chunks: AsyncIterator[str], release: Callable[[], None], headers: dict) -> StreamingResponse:
    # The release runs when the stream ends, and again (idempotent) as a background task in case the
    # client left before the stream started.
    return StreamingResponse(_released(chunks, release), media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(release))


def _best(choices: list[_Choice], best_of: int, n: int) -> list[_Choice]:
    """Per prompt, the n of its best_of choices with the highest cumulative logprob, most likely first."""
    if best_of == n:
        return choices
    return [choice for start in range(0, len(choices), best_of)
            for choice in sorted(choices[start:start + best_of], key=lambda c: -sum(e.logprob for e in c.logprobs))[:n]]


def _usage(choices: list[_Choice], n: int) -> dict:
    firsts = choices[::n]  # each prompt once, however many choices it has
    return fmt.usage(sum(c.prompt_tokens for c in firsts), sum(c.completion_tokens for c in choices),
                     sum(c.cached_tokens for c in firsts))


async def _run(request: Request, state: AppState, body, prompts: list, params: SamplingParams, n: int,
               endpoint: str, tokens: int,
               to_chunks: Callable[[AsyncIterator[ChoiceOutput], fmt.LogprobFormatter], AsyncIterator[str]]):
    """Admit against the tenant's limits, resolve `model`, run every choice: a streamed request gets its
    StreamingResponse, others their collected choices; each with the resolved target.

    `model` is resolved after the parameters were checked, so a request refused for its parameters is
    not counted against an experiment's variant. The admission is released when the stream ends, or as
    soon as the request is answered or refused."""
    release = _admit(request, state, tokens)
    streaming = None
    try:
        target = await state.models.resolve(body.model, _caller(request, body.user), caller(request))
        request.state.metrics_label = target.label
        outputs = await state.inference.run(prompts, params, n, target, endpoint, caller(request).tenant)
        if body.stream:
            streaming = _streaming(to_chunks(outputs, _formatter(state, target)), release, _variant_header(target))
            return streaming, target
        return await _collect(outputs, len(prompts) * n), target
    finally:
        if streaming is None:
            release()


def _formatter(state: AppState, target: Target) -> fmt.LogprobFormatter:
    """Token strings from the target's tokenizer (an adapter with a resized vocabulary names its new ids)."""
    return fmt.LogprobFormatter(state.tokenizers.of(target.adapter))


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = app_state(request)
    return ModelList(data=state.models.cards(state.access.visible_names(caller(request))))


@router.get("/v1/models/{model}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    state = app_state(request)
    card = next((c for c in state.models.cards(state.access.visible_names(caller(request))) if c.id == model), None)
    if card is None:
        raise UnknownAdapterError(f"model {model!r} does not exist")
    return card


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, response: Response):
    state = app_state(request)
    best_of = _best_of(body)
    prompt_top = _prompt_top(body)
    # Ranking best_of choices needs each chosen token's logprob; max_tokens=0 (echo) samples one token, dropped.
    params = _sampling(body, max(body.token_limit(), 1), body.logprobs if best_of == body.n else body.logprobs or 0,
                       prompt_top, await _grammar(state, body))
    prompts = body.prompts()
    echo = _Echo.of(prompts, state.tokenizer) if body.echo else None
    response_id = f"cmpl-{request.state.request_id}"
    generated, target = await _run(
        request, state, body, prompts, params, best_of, "completions", params.max_tokens * best_of * len(prompts),
        lambda outputs, formatter: _completion_chunks(outputs, formatter, response_id, body, len(prompts) * body.n,
                                                      echo))
    if isinstance(generated, StreamingResponse):
        return generated
    response.headers.update(_variant_header(target))
    if body.token_limit() == 0:
        generated = [replace(c, text="", logprobs=[], completion_tokens=0, finish_reason="length") for c in generated]
    formatter = _formatter(state, target)
    return fmt.envelope(response_id, "text_completion", body.model, [
        _completion_choice(i, c.text, c.logprobs, c.prompt_logprobs, c.finish_reason, body, formatter,
                           echo.prompt(i // body.n) if echo else None, 0)
        for i, c in enumerate(_best(generated, best_of, body.n))
    ], _usage(generated, best_of))


@dataclass(frozen=True)
class _Echo:
    """The prompts of a completions request as echo shows them: their text, and their first tokens (the
    only ones without a logprob)."""

    texts: list[str]
    first_tokens: list[int]

    @classmethod
    def of(cls, prompts: list[str | list[int]], tokenizer: PreTrainedTokenizerBase) -> "_Echo":
        ids = [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
        return cls([p if isinstance(p, str) else tokenizer.decode(p) for p in prompts], [i[0] for i in ids])

    def prompt(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.first_tokens[index]


def _completion_choice(index: int, text: str, entries: list[TokenLogprobs], prompt_entries: list[TokenLogprobs] | None,
                       finish_reason: str | None, body: CompletionRequest, formatter: fmt.LogprobFormatter,
                       echo: tuple[str, int] | None, text_offset: int) -> dict:
    """One choice of a completions response or chunk; `echo` (the prompt's text and first token) puts the
    prompt, and its logprobs, first."""
    first = None
    if echo is not None:
        text, entries, first = echo[0] + text, (prompt_entries or []) + entries, echo[1]
    answer = {"index": index, "text": text, "finish_reason": finish_reason,
              "logprobs": formatter.completion(entries, text_offset, first) if body.logprobs is not None else None}
    if body.prompt_logprobs is not None and prompt_entries is not None:
        answer["prompt_logprobs"] = formatter.prompt(prompt_entries)
    return answer


def _prompt_top(body: CompletionRequest) -> int | None:
    """How many top tokens each prompt token's logprobs need (echo with logprobs, vLLM's prompt_logprobs)."""
    if body.token_limit() == 0 and not body.echo:
        raise ApiError(400, "max_tokens=0 needs echo (the prompt is all there is to return)", param="max_tokens",
                       code="invalid_parameter")
    asked = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    return max(asked, default=None)


def _best_of(body: CompletionRequest) -> int:
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise ApiError(400, f"best_of ({best_of}) must be >= n ({body.n})", param="best_of", code="invalid_parameter")
    if best_of > body.n and body.stream:
        raise ApiError(400, "best_of > n cannot be streamed (the best are known only at the end)", param="best_of",
                       code="invalid_parameter")
    return best_of


async def _completion_chunks(outputs: AsyncIterator[ChoiceOutput], formatter: fmt.LogprobFormatter, response_id: str,
                             body: CompletionRequest, count: int, echo: _Echo | None) -> AsyncIterator[str]:
    choices = [_Choice() for _ in range(count)]
    prompt_only = body.token_limit() == 0  # the one token sampled is not returned
    async for item in outputs:
        out, choice = item.output, choices[item.index]
        first_output = not choice.prompt_tokens
        text, entries = ("", []) if prompt_only else (out.text, out.logprobs)
        finish = ("length" if prompt_only else out.finish_reason.value) if out.finished else None
        entry = _completion_choice(item.index, text, entries, out.prompt_logprobs, finish, body, formatter,
                                   echo.prompt(item.index // body.n) if echo and first_output else None,
                                   choice.token_chars)
        choice.token_chars += sum(map(len, entry["logprobs"]["tokens"])) if entry["logprobs"] else 0
        choice.prompt_tokens, choice.completion_tokens = out.prompt_tokens, 0 if prompt_only else out.completion_tokens
        choice.cached_tokens = out.cached_tokens
        yield fmt.sse(fmt.envelope(response_id, "text_completion", body.model, [entry]))
    if body.stream_options and body.stream_options.include_usage:
        yield fmt.sse(fmt.envelope(response_id, "text_completion", body.model, [], _usage(choices, body.n)))
    yield fmt.sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
    state = app_state(request)
    max_tokens = body.token_limit() or state.default_max_tokens
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_parameter")
    top = (body.top_logprobs or 0) if body.logprobs else None
    await _check_tool_parameters(state, body)
    params = _sampling(body, max_tokens, top, grammar=await _grammar(state, body))
    if body.token_limit() is None:
        params = replace(params, max_tokens_fits_context=True)
    definitions = [tool.model_dump(exclude_none=True) for tool in body.tools or []] or None
    prompt = chat_prompt(state.tokenizer, body.messages, definitions)
    response_id = f"chatcmpl-{request.state.request_id}"
    choices, target = await _run(request, state, body, [prompt], params, body.n, "chat", max_tokens * body.n,
                                 lambda outputs, formatter: _chat_chunks(outputs, formatter, response_id, body))
    if isinstance(choices, StreamingResponse):
        return choices
    response.headers.update(_variant_header(target))
    logprobs = _formatter(state, target)
    return fmt.envelope(response_id, "chat.completion", body.model, [
        {"index": i, **_chat_message(c, body), "logprobs": logprobs.chat(c.logprobs) if body.logprobs else None}
        for i, c in enumerate(choices)
    ], _usage(choices, body.n))


async def _check_tool_parameters(state: AppState, body: ChatCompletionRequest) -> None:
    """Each tool's parameters compile as a JSON schema (cached), else 400 naming that tool's field."""
    compiler = compiler_for(state.tokenizer) if body.tools else None
    for i, tool in enumerate(body.tools or []):
        spec = GrammarSpec("json", json.dumps(tools.parameters_schema(tool.function.model_dump())),
                           f"tools.{i}.function.parameters")
        await asyncio.to_thread(compiler.compile, spec)


def _tool_names(body: ChatCompletionRequest) -> set[str] | None:
    """The names a parser looks for in the output, or None when the output is text (no tools, "none")."""
    return None if body.tool_mode() == "none" else {tool.function.name for tool in body.tools}


def _chat_message(choice: _Choice, body: ChatCompletionRequest) -> dict:
    """A whole choice's message and finish_reason: its calls parsed out of the text, when tools are on."""
    names = _tool_names(body)
    if names is None:
        return {"message": {"role": "assistant", "content": choice.text}, "finish_reason": choice.finish_reason}
    content, calls = tools.parse(choice.text, names)
    message = {"role": "assistant", "content": content}
    if not calls:
        return {"message": message, "finish_reason": choice.finish_reason}
    return {"message": {**message, "tool_calls": [call.openai() for call in calls]},
            "finish_reason": _finish_with_calls(choice.finish_reason)}


def _finish_with_calls(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


async def _chat_chunks(outputs: AsyncIterator[ChoiceOutput], logprobs: fmt.LogprobFormatter, response_id: str,
                       body: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return fmt.sse(fmt.envelope(response_id, "chat.completion.chunk", body.model, choices, usage))

    choices = [_Choice() for _ in range(body.n)]
    names = _tool_names(body)
    eager = body.tool_mode() in ("required", "named")  # the grammar makes every block a call
    parsers = [tools.ToolCallParser(names, eager) for _ in range(body.n)] if names is not None else None
    for i in range(body.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for item in outputs:
        out = item.output
        choices[item.index].prompt_tokens = out.prompt_tokens
        choices[item.index].cached_tokens = out.cached_tokens
        choices[item.index].completion_tokens = out.completion_tokens
        entries = logprobs.chat(out.logprobs) if body.logprobs else None
        if parsers is None:
            if out.text or out.logprobs:
                yield chunk([{"index": item.index, "delta": {"content": out.text}, "finish_reason": None,
                              "logprobs": entries}])
        else:
            parser = parsers[item.index]
            events = parser.feed(out.text) + (parser.finish() if out.finished else [])
            for delta in _tool_deltas(events):
                yield chunk([{"index": item.index, "delta": delta, "finish_reason": None, "logprobs": entries}])
                entries = None  # a piece's logprobs go with its first delta
            if entries is not None and out.logprobs:
                yield chunk([{"index": item.index, "delta": {}, "finish_reason": None, "logprobs": entries}])
        if out.finished:
            finish = out.finish_reason.value
            if parsers is not None and parsers[item.index].calls:
                finish = _finish_with_calls(finish)
            yield chunk([{"index": item.index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(choices, body.n))
    yield fmt.sse("[DONE]")


def _tool_deltas(events: list[tuple[str, object]]) -> list[dict]:
    """OpenAI's streamed deltas for parsed events: content as it is; a call's index, id and name (arguments
    empty), then its arguments in pieces."""
    deltas = []
    for kind, value in events:
        if kind == "content":
            deltas.append({"content": value})
        elif kind == "start":
            index, call_id, name = value
            deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
        else:
            index, piece = value
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return deltas
