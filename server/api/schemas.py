"""Request and response bodies of the OpenAI-compatible API.

Nothing is accepted and ignored: a request body holds only fields loraserve honours, plus fields that
clients send with values that change nothing (`store: false`, `functions: []`, ...), which are
accepted at those values only. Any other field, or another value of those, is refused with 400 naming it.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.tools import NAME_PATTERN, grammar_spec as tool_grammar
from server.engine.grammar import MAX_GRAMMAR_CHARS, GrammarSpec
from server.engine.sequence import LOGIT_BIAS_RANGE, PENALTY_RANGE, REPETITION_PENALTY_RANGE, SEED_RANGE
from server.errors import InvalidRequestError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# The longest `model` string that can name anything: a 64-character name, '@' and a version number.
MAX_MODEL_LENGTH = 96
MAX_N = 16  # choices per prompt (n, best_of)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_CHOICES = 256  # guided_choice entries
MAX_TOOLS = 128  # OpenAI's limit on tools


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


_NO_FUNCTIONS = "the legacy functions/function_call (use tools/tool_choice)"


class FunctionDefinition(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, at most 64")
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments (an object)")
    strict: bool | None = Field(None, description="accepted; a forced call always follows the schema")

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError('parameters must be a JSON schema of an object ({"type": "object", ...})')
        return value


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Strict):
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text = Field(max_length=MAX_GRAMMAR_CHARS, description="JSON text, as the model wrote it")


class AssistantToolCall(_Strict):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(None, max_length=256)
    tool_calls: list[AssistantToolCall] | None = Field(None, max_length=128, description="assistant messages: "
                                                                                          "the calls it made")
    tool_call_id: Text | None = Field(None, max_length=256, description="tool messages: the call answered")
    # What clients send back with an earlier assistant message (openai's model_dump()): nulls only.
    function_call: Annotated[dict[str, Any] | None, _neutral(None, feature=_NO_FUNCTIONS)] = None
    refusal: Annotated[str | None, _neutral(None, feature="refusal messages")] = None
    audio: Annotated[dict[str, Any] | None, _neutral(None, feature="audio")] = None

    @model_validator(mode="after")
    def _tool_fields_on_their_roles(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id belongs to tool messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (enforced when forced)")
    functions: Annotated[list[dict[str, Any]] | None, _neutral(None, [], feature=_NO_FUNCTIONS)] = None
    function_call: Annotated[str | dict[str, Any] | None, _neutral(None, "none", "auto", feature=_NO_FUNCTIONS)] = None
    modalities: Annotated[list[str] | None, _neutral(None, ["text"], feature="modalities other than text")] = None

    def _check_tools(self) -> None:
        """What field validation cannot see: names unique, a choice among the tools."""
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise InvalidRequestError("tools: two functions have the same name", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidRequestError(f"tool_choice names {self.tool_choice.function.name!r}, which is not "
                                      "among tools", param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise InvalidRequestError('tool_choice "required" needs tools', param="tool_choice")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named": what the tools do with this request's output."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions a forced choice allows (required: all of them; named: that one), else none."""
        mode = self.tool_mode()
        if mode not in ("required", "named"):
            return []
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools
                if mode == "required" or tool.function.name == self.tool_choice.function.name]

    def grammar_spec(self) -> GrammarSpec | None:
        """The structured output asked for, or the grammar of a forced tool choice (never both)."""
        self._check_tools()
        spec = super().grammar_spec()
        functions = self.forced_functions()
        if not functions:
            return spec
        if spec is not None:
            raise InvalidRequestError(f"a forced tool_choice cannot be combined with {spec.param}",
                                      param="tool_choice")
        return tool_grammar(functions, self.parallel_tool_calls is not False)


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraserve"
    root: str
    parent: str | None = None
    # The base's card only: how it is quantized ('none', 'bnb-nf4', ...) and the bytes it holds in memory.
    quantization: str | None = None
    resident_bytes: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
