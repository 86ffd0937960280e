"""Turning chat messages into a prompt: the tokenizer's own chat template, or a plain fallback.

Tools (server/api/tools.py) go to a template that mentions `tools` as transformers passes them
(`apply_chat_template(..., tools=...)`), earlier calls as each assistant message's `tool_calls` (arguments
as a dict) and results as `tool` messages with their `tool_call_id`. A template that never mentions `tools`
would drop them: the tools are then described in a system preamble, and earlier calls are written into
the assistant's content in the Hermes format the preamble asks for."""

from transformers import PreTrainedTokenizerBase

from server.api import tools as tool_format
from server.api.schemas import ChatMessage

# Used when the tokenizer ships no template: role-tagged turns, then the assistant's turn opened.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
    source = getattr(tokenizer, "chat_template", None)
    template = None if source else FALLBACK_TEMPLATE
    native = bool(source) and isinstance(source, str) and "tools" in source
    plain = [_message(m, native) for m in messages]
    if tools and not native:
        plain = _with_preamble(plain, tool_format.preamble(tools))
    return tokenizer.apply_chat_template(plain, chat_template=template, add_generation_prompt=True, tokenize=False,
                                         **({"tools": tools} if tools and native else {}))


def _message(message: ChatMessage, native: bool) -> dict:
    plain = {"role": message.role, "content": message.text(), **({"name": message.name} if message.name else {})}
    if message.tool_call_id is not None:
        plain["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = [(c.function.name, tool_format.template_arguments(c.function.arguments)) for c in message.tool_calls]
        if native:
            plain["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": name, "arguments": args}}
                                   for c, (name, args) in zip(message.tool_calls, calls)]
        else:
            written = "\n".join(tool_format.call_text(name, args) for name, args in calls)
            plain["content"] = "\n".join(part for part in (plain["content"], written) if part)
    return plain


def _with_preamble(messages: list[dict], preamble: str) -> list[dict]:
    """The preamble before the first system (or developer) message's text, or as a system message of its own."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{preamble}\n\n{messages[0]['content']}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]
