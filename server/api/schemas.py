"""Request and response bodies of the OpenAI-compatible API.

Nothing is accepted and ignored: a request body holds only fields loraserve honours, plus fields that
clients send with values that change nothing (`tool_choice: "none"`, `store: false`, ...), which are
accepted at those values only. Any other field, or another value of those, is refused with 400 naming it.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.grammar import GrammarSpec
from server.engine.sequence import LOGIT_BIAS_RANGE, PENALTY_RANGE, REPETITION_PENALTY_RANGE, SEED_RANGE
from server.errors import InvalidRequestError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# The longest `model` string that can name anything: a 64-character name, '@' and a version number.
MAX_MODEL_LENGTH = 96
MAX_N = 16  # choices per prompt (n, best_of)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_CHOICES = 256  # guided_choice entries


def _utf8(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800") that no tokenizer or database accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (a lone surrogate at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def _neutral(*values: Any, feature: str):
    """A field accepted only at the values that change nothing; any other is refused as not supported."""
    def check(value: Any) -> Any:
        if value not in values:
            allowed = " or ".join(json.dumps(v) for v in values)
            raise ValueError(f"{feature} is not supported yet; only {allowed} is accepted")
        return value
    return AfterValidator(check)


def _is_token_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and len(key) <= 10  # not "²", nor more digits than int() takes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never ignored


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Annotated[bool | None, _neutral(None, False, feature="stream obfuscation")] = None


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with {"type": "json_schema"}, and only then')
        return self


class _SamplingFields(_Strict):
    model: Text = Field(min_length=1, max_length=MAX_MODEL_LENGTH)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="vLLM extension: 0 = off")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: Text | None = Field(None, max_length=1024)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")
    frequency_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    logit_bias: dict[str, Annotated[float, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]] | None = None
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                      description="vLLM extension: 1 = off")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM extension: 0 = off")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: EOS is banned until this many tokens were generated")
    # Structured outputs (server/engine/grammar.py): at most one of these.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = Field(None, description="vLLM extension: a JSON schema")
    guided_regex: Text | None = Field(None, description="vLLM extension: the output matches this regex")
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES,
                                             description="vLLM extension: the output is one of these")
    # Sent by clients with these values; other values are not supported yet.
    service_tier: Annotated[str | None, _neutral(None, "auto", "default", feature="service_tier")] = None
    store: Annotated[bool | None, _neutral(None, False, feature="storing completions")] = None
    metadata: dict[Text, Text] | None = Field(None, max_length=16, description="accepted; kept nowhere (store is off)")

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and (len(value) > MAX_LOGIT_BIAS or not all(_is_token_id(key) for key in value)):
            raise ValueError(f"logit_bias maps at most {MAX_LOGIT_BIAS} token ids (as strings) to biases")
        return value

    def grammar_spec(self) -> GrammarSpec | None:
        """The structured output asked for, if any (compiled by the route, off the event loop)."""
        given = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None
                 and not (name == "response_format" and self.response_format.type == "text")]
        if len(given) > 1:
            raise InvalidRequestError(f"give at most one of {', '.join(given)}", param=given[1])
        if self.guided_json is not None:
            return GrammarSpec("json", _schema_text(self.guided_json, "guided_json"), "guided_json")
        if self.guided_regex is not None:
            return GrammarSpec("regex", self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return GrammarSpec("choice", json.dumps(self.guided_choice), "guided_choice")
        form = self.response_format
        if form is None or form.type == "text":
            return None
        schema = form.json_schema.schema_ if form.json_schema is not None else {"type": "object"}
        return GrammarSpec("json", _schema_text(schema, "response_format"), "response_format")

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


_GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """A JSON schema as canonical text (the compile cache's key)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequestError(f"{param} is not valid JSON", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema (an object)", param=param)
    return json.dumps(schema, sort_keys=True)


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=0, description="0: with echo, the prompt only")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="the prompt (and, with logprobs, its logprobs) before the completion")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="vLLM extension: each prompt token's "
                                                                        "logprob, rank and the top ones")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="generate this many, return the n most likely")
    suffix: Annotated[str | None, _neutral(None, "", feature="suffix (insertion)")] = None

    def token_limit(self) -> int:
        """OpenAI's completions read an explicit null as the default."""
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ContentPart(_Strict):
    type: Literal["text"]
    text: Text


_NO_TOOLS = "tool calling"


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(None, max_length=256)
    # What clients send back with an earlier assistant message (openai's model_dump()): nulls only.
    tool_calls: Annotated[list[dict[str, Any]] | None, _neutral(None, [], feature=_NO_TOOLS)] = None
    function_call: Annotated[dict[str, Any] | None, _neutral(None, feature=_NO_TOOLS)] = None
    tool_call_id: Annotated[str | None, _neutral(None, feature=_NO_TOOLS)] = None
    refusal: Annotated[str | None, _neutral(None, feature="refusal messages")] = None
    audio: Annotated[dict[str, Any] | None, _neutral(None, feature="audio")] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[dict[str, Any]] | None, _neutral(None, [], feature=_NO_TOOLS)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _neutral(None, "none", "auto", feature=_NO_TOOLS)] = None
    parallel_tool_calls: bool | None = Field(None, description="accepted: there are no tools to call")
    functions: Annotated[list[dict[str, Any]] | None, _neutral(None, [], feature=_NO_TOOLS)] = None
    function_call: Annotated[str | dict[str, Any] | None, _neutral(None, "none", "auto", feature=_NO_TOOLS)] = None
    modalities: Annotated[list[str] | None, _neutral(None, ["text"], feature="modalities other than text")] = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Strict):
    model: Text = Field(min_length=1, max_length=MAX_MODEL_LENGTH)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages "
                                                              "(the chat template writes its own)")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: Text = Field(min_length=1, max_length=MAX_MODEL_LENGTH)
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraserve"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
