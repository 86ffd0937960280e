"""Tool calling on /v1/chat/completions: the tools in the prompt, the grammar that forces a call, and the
parser that reads calls out of the output.

The one text format, Hermes-style (NousResearch's Hermes 2/3, Qwen 2.5/3 and others' chat templates emit
and read it, and it is what transformers' chat-template documentation uses for tool use):

    <tool_call>
    {"name": "<a tool's name>", "arguments": {<that tool's parameters>}}
    </tool_call>

one block per call, several blocks for parallel calls (separated by a newline). It was chosen because
the call's JSON is delimited by tags that never occur in ordinary text, so `auto` can tell a call from
prose without guessing, and because templates that support tools already render earlier calls in it.

- `tool_choice: "required"` or a named function: the output is constrained by a grammar (llguidance's
  lark with `%json`): one block, or with `parallel_tool_calls` not false one to MAX_PARALLEL_CALLS blocks, whose JSON is
  `{"name": <one of the allowed tools>, "arguments": <that tool's parameters schema>}`.
- `"auto"` (the default with tools): free sampling; every complete block whose JSON is an object naming a
  given tool with object arguments becomes a call, the rest of the text (whitespace around the blocks
  dropped) is the content. A block that is not such a call stays in the content, as text.
- `"none"`: the tools are still shown to the model (as OpenAI and vLLM do), the output is text, unparsed.

A template whose source never mentions `tools` would drop them silently; the tools are then described in a
system preamble (`preamble`) that asks for this format, and earlier calls are written into the assistant's
content in it. The parser reads text incrementally (`ToolCallParser.feed`), so streamed and whole answers
are cut into content and calls by the same code: a call is streamed once its closing tag is read, or,
with a forced choice, as it is written (its id and name, then its arguments in pieces).
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from server.engine.grammar import JSON_OPTIONS, GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MAX_PARALLEL_CALLS = 8  # a forced answer's calls: a model that repeats itself stops after this many


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: _new_id())

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_text(name: str, arguments: dict | str) -> str:
    """One call in the format, as the grammar writes it (compact JSON with json.dumps' separators)."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def parameters_schema(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def grammar_spec(functions: list[dict], parallel: bool) -> GrammarSpec:
    """The grammar of a forced choice: calls of these functions (each {"name", "parameters"})."""
    objects = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]}, "arguments": parameters_schema(f)}} for f in functions]
    schema = {**(objects[0] if len(objects) == 1 else {"anyOf": objects}), "x-guidance": JSON_OPTIONS}
    start = f'start: call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "start: call"
    lark = f'{start}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'
    return GrammarSpec("lark", lark, "tool_choice")


def preamble(tools: list[dict]) -> str:
    """The system text that describes the tools to a model whose chat template has no place for them."""
    described = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("You may call these tools (functions); each is described by a JSON schema:\n"
            f"{described}\n"
            "To call one, answer with this block, one block per call:\n"
            f'{OPEN}\n{{"name": <the function\'s name>, "arguments": <its arguments as a JSON object>}}\n{CLOSE}')


def _holdback(text: str) -> int:
    """Where the longest suffix of `text` that could start the opening tag begins."""
    for start in range(max(0, len(text) - len(OPEN) + 1), len(text)):
        if OPEN.startswith(text[start:]):
            return start
    return len(text)


class ToolCallParser:
    """Cuts an output, fed in pieces, into content and calls. `feed` and `finish` return the events known
    so far, in order: ("content", text), ("start", (index, id, name)) and ("arguments", (index, piece)).
    Whitespace next to a call is dropped.

    A call's start and arguments are sent when its block closes; `eager` (a forced choice, whose grammar
    guarantees every block is a call) sends them as they come: the start once `{"name": "<a tool>",
    "arguments": ` is read, then the arguments as they grow, holding back a last `}` followed by nothing but
    whitespace and the start of the closing tag (it may be the block's own closing brace). A forced call cut by max_tokens is then left open in
    the stream, where a whole answer has its text as content."""

    def __init__(self, names: set[str], eager: bool = False):
        self._names = names
        self._eager = eager
        self._buffer = ""
        self._held = ""  # trailing whitespace of the content, sent only if more content follows
        self._in_call = False
        self._after_call = False
        self._open: tuple[str, str] | None = None  # (id, name) of a call started before its block closed
        self._sent = 0  # how many characters of the open call's arguments went out
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buffer += text
        events: list[tuple[str, object]] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events + (self._stream_open(self._buffer) if self._eager else [])
                block, self._buffer, self._in_call = self._buffer[:end], self._buffer[end + len(CLOSE):], False
                events += self._close(block)
            else:
                start = self._buffer.find(OPEN)
                if start < 0:
                    cut = _holdback(self._buffer)
                    events += self._content(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                    return events
                events += self._content(self._buffer[:start])
                self._buffer, self._in_call, self._held = self._buffer[start + len(OPEN):], True, ""

    def finish(self) -> list[tuple[str, object]]:
        """The end of the output: an unclosed block is content (unless it was streamed as a call already);
        held whitespace is kept when there is no call."""
        rest = "" if self._open else (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call, self._open = "", False, None
        events = self._content(rest)
        if self._held and not self.calls:
            events.append(("content", self._held))
        self._held = ""
        return events

    def _stream_open(self, text: str) -> list[tuple[str, object]]:
        head = _HEAD.match(text)
        if head is None or head.group(1) not in self._names:
            return []
        index, events = len(self.calls), []
        if self._open is None:
            self._open = (_new_id(), head.group(1))
            events.append(("start", (index, *self._open)))
        arguments = text[head.end():]
        last = arguments.rfind("}")  # held back while it may be the block's own closing brace
        upto = last if last >= 0 and CLOSE.startswith(arguments[last + 1:].lstrip()) else len(arguments)
        if upto > self._sent:
            events.append(("arguments", (index, arguments[self._sent:upto])))
            self._sent = upto
        return events

    def _close(self, block: str) -> list[tuple[str, object]]:
        call = self._call(block, self._open[0] if self._open else _new_id())
        if call is None:  # never after a start: that comes only from a grammar, whose blocks are calls
            return self._content(OPEN + block + CLOSE)
        index, events = len(self.calls), []
        if self._open is None:
            events.append(("start", (index, call.id, call.name)))
        if call.arguments[self._sent:]:
            events.append(("arguments", (index, call.arguments[self._sent:])))
        self.calls.append(call)
        self._open, self._sent, self._held, self._after_call = None, 0, "", True
        return events

    def _content(self, text: str) -> list[tuple[str, object]]:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        text = self._held + text
        kept = text.rstrip()
        self._held = text[len(kept):]
        return [("content", kept)] if kept else []

    def _call(self, block: str, call_id: str) -> ToolCall | None:
        """The block as a call, its arguments as the model wrote them (what `eager` streamed), or None."""
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if (not isinstance(value, dict) or set(value) != {"name", "arguments"} or value["name"] not in self._names
                or not isinstance(value["arguments"], dict)):
            return None
        head, written = _HEAD.match(block), block.rstrip()
        arguments = written[head.end():-1] if head and written.endswith("}") else ""
        if not _same_json(arguments, value["arguments"]):
            arguments = json.dumps(value["arguments"], ensure_ascii=False)
        return ToolCall(value["name"], arguments, call_id)


_HEAD = re.compile(r'\s*\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _same_json(text: str, value: object) -> bool:
    try:
        return json.loads(text) == value
    except ValueError:
        return False


def parse(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """A whole output: its content (None when it is all calls) and its calls."""
    parser = ToolCallParser(names)
    events = parser.feed(text) + parser.finish()
    content = "".join(value for kind, value in events if kind == "content")
    return (content or None) if parser.calls else content, parser.calls


def template_arguments(arguments: str) -> dict | str:
    """An earlier call's arguments as chat templates want them: a dict (they `tojson` it), else the text."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments

