"""Long real text that nobody on this project wrote, and passkey prompts built from it.

The text is Python's own help: ``pydoc_data.topics.topics``, a dict of long reference entries that ships
with every CPython. Entries are joined in sorted key order, so the same text comes back on every machine
with the same Python.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

NEEDLE = "The pass key is {key}. Remember it."
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
QUESTION = "\n\nWhat is the pass key? The pass key is"


def long_text() -> str:
    """Python's help topics, joined in sorted key order (about 465,000 characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_ids(tokenizer, length: int, offset: int = 0) -> list[int]:
    """``length`` token ids of :func:`long_text` (``tokenizer`` is a :class:`~mmkv_compile.bench.models.Codec`), starting ``offset`` tokens in. Raise when it is too short."""
    ids = _encoded(tokenizer)
    if offset + length > len(ids):
        raise ValueError(f"the help text has {len(ids)} tokens; {offset + length} were asked for")
    return ids[offset : offset + length]


@functools.lru_cache(maxsize=4)
def _encoded(tokenizer) -> list[int]:
    return tokenizer.encode(long_text())  # a few seconds for a real tokenizer: once per tokenizer


@dataclass
class PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with a pass key at ``depth`` (0 = start of the filler, 1 = end)."""

    ids: list[int]
    key: str
    depth: float
    length: int


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """Filler from the help text with the pass key sentence inserted at ``depth``, then the question.

    The needle goes in at a line break of the filler (the nearest one before the depth), so it reads as
    its own sentence. The key is five digits drawn from ``seed``.
    """
    key = f"{random.Random(seed).randint(10000, 99999)}"
    intro = tokenizer.encode(INTRO)
    needle = tokenizer.encode("\n" + NEEDLE.format(key=key) + "\n")
    question = tokenizer.encode(QUESTION)
    filler_len = length - len(intro) - len(needle) - len(question)
    if filler_len < 1:
        raise ValueError(f"a passkey prompt needs more than {length - filler_len} tokens; got length={length}")
    filler = token_ids(tokenizer, filler_len)
    cut = _line_break_before(tokenizer, filler, round(depth * filler_len))
    ids = intro + filler[:cut] + needle + filler[cut:] + question
    return PasskeyPrompt(ids=ids, key=key, depth=depth, length=len(ids))


def _line_break_before(tokenizer, ids: list[int], index: int) -> int:
    """The index just after the last token before ``index`` whose text ends a line (``index`` if none)."""
    for cut in range(index, max(index - 64, 0), -1):
        if tokenizer.decode(ids[cut - 1 : cut]).endswith("\n"):
            return cut
    return index
