"""A byte-level tokenizer built on the spot: nothing to download, every string encodes."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from server.api.chat import FALLBACK_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """3 special tokens, then one token per byte (no merges). Adds no BOS: a prompt is just its bytes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer with the chat format the demo is trained on (`<|user|>\\n…\\n<|assistant|>\\n`).

    Only the demo's: tests build models on the template-less `byte_tokenizer`. The template is the server's
    fallback format, written into the checkpoint so any client of it (transformers too) renders the same."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = FALLBACK_TEMPLATE
    return tokenizer
