"""Turning chat messages into a prompt: the tokenizer's own chat template, or a plain fallback."""

from transformers import PreTrainedTokenizerBase

from server.api.schemas import ChatMessage

# Used when the tokenizer ships no template: role-tagged turns, then the assistant's turn opened.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> str:
    plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(plain, chat_template=template, add_generation_prompt=True, tokenize=False)
