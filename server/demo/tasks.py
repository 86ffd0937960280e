"""The demo's string tasks: the base copies its input; each adapter transforms the copy visibly.

A completion prompt is the text and a newline (`"hello world\n"`); a chat request is one user message
holding the text, rendered by the demo tokenizer's chat template. The answer is the (transformed) text,
then EOS.
"""

import codecs
import itertools
import random
import string
import zlib
from collections.abc import Callable, Iterator

ALPHABET = string.ascii_lowercase + " "
# The base copies mixed case, so it already writes upper-case letters: on a base that never wrote them,
# the `upper` adapter (which leaves the output head alone) did not learn at all.
BASE_ALPHABET = string.ascii_letters + " "
MIN_LEN, MAX_LEN = 3, 16
SEPARATOR = "\n"
FORMATS = ("completion", "chat")
# The strings README's examples send: trained on now and then (never held out), so the quickstart answers
# exactly whatever the seed; accuracy is still judged on held-out strings only.
SHOWCASE = ("hello world", "loraserve works", "make me loud")
SHOWCASE_EVERY = 50

# The base's task, then one per adapter: what each one does to the text.
BASE_TASK = "copy"
TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda text: text,
    "reverse": lambda text: text[::-1],
    "upper": str.upper,
    "rot13": lambda text: codecs.encode(text, "rot13"),
}
ADAPTER_TASKS = [name for name in TASKS if name != BASE_TASK]


def prompt(text: str) -> str:
    return text + SEPARATOR


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def answer(task: str, text: str) -> str:
    return TASKS[task](text)


def is_held_out(text: str) -> bool:
    """A fixed 1-in-8 slice of all strings, by hash: never trained on, whatever the seed or step count."""
    return zlib.crc32(text.encode()) % 8 == 0


def _random_text(rng: random.Random, alphabet: str = ALPHABET) -> str:
    # No leading/trailing/double spaces: a copy of "  a" is hard to judge by eye, and never needed.
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if text == " ".join(text.split()):
            return text


def training_texts(task: str, seed: int) -> Iterator[str]:
    """An endless stream of training strings for `task`, none of them held out."""
    rng, alphabet = random.Random(seed), BASE_ALPHABET if task == BASE_TASK else ALPHABET
    for count in itertools.count(1):
        if count % SHOWCASE_EVERY == 0:
            yield SHOWCASE[count // SHOWCASE_EVERY % len(SHOWCASE)]
            continue
        text = _random_text(rng, alphabet)
        if not is_held_out(text):
            yield text


def held_out_texts(count: int, seed: int = 1234) -> list[str]:
    """`count` distinct held-out strings (disjoint from every training stream by construction)."""
    rng, found = random.Random(seed), {}
    while len(found) < count:
        text = _random_text(rng)
        if is_held_out(text):
            found[text] = None
    return list(found)
