"""Token ids of a prompt in which user text stays text.

A rendered prompt mixes our structure (the chat template's turns, our ``<image>`` placeholders)
with the user's question and ``prompt`` text. Tokenizing it as one string would turn any special
token written by the user (``<image>``, ``<|im_start|>``, ``<|im_end|>``...) into the real control
token: a forged turn, or an image count that no longer matches the images. So the text is split
where the tokenizer itself would split it, at its added tokens, but only at those outside the
user's spans; each run between them is encoded with ``split_special_tokens=True``, which keeps
special-token strings literal. The tokenizer encodes the runs between added tokens separately
anyway, so for text without special-token strings the ids are exactly the processor's.

Only the tokenizer is needed to know the control tokens, which is why this happens in the worker:
the API does not load the model's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from common.errors import InvalidRequest

Span = tuple[int, int]  # [start, end) of the prompt's text written by the user


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """Every added token of the tokenizer (special ones and the image token among them), by text."""
    return {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}


def _trusted_regions(length: int, user_spans: Sequence[Span]) -> Iterator[Span]:
    start = 0
    for span_start, span_end in sorted(user_spans):
        if span_start > start:
            yield start, span_start
        start = max(start, span_end)
    if start < length:
        yield start, length


def prompt_ids(
    tokenizer: Any, text: str, user_spans: Sequence[Span], *, image_token: str, image_token_count: int
) -> list[int]:
    """The ids of ``text``: control tokens only where our own structure wrote them, each of our
    ``image_token`` expanded to ``image_token_count`` ids as the processor expands it."""
    tokens = control_tokens(tokenizer)
    # Longest first: at one position the tokenizer's own split takes the longest added token.
    pattern = re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)) or "(?!)")
    ids: list[int] = []
    run_start = 0
    for start, end in _trusted_regions(len(text), user_spans):
        for match in pattern.finditer(text, start, end):
            ids += _encode_literal(tokenizer, text[run_start : match.start()])
            token = match.group()
            ids += [tokens[token]] * (image_token_count if token == image_token else 1)
            run_start = match.end()
    ids += _encode_literal(tokenizer, text[run_start:])
    return ids


def _encode_literal(tokenizer: Any, run: str) -> list[int]:
    if not run:
        return []
    try:
        run.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("the question or prompt is not valid Unicode text (it holds a lone surrogate)") from None
    ids = list(tokenizer(run, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    # split_special_tokens keeps special tokens literal; an added token not marked special would
    # still be matched, so such a tokenizer's text is refused rather than given control.
    names = {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}
    smuggled = sorted({names[token_id] for token_id in ids if token_id in names})
    if smuggled:
        raise InvalidRequest(f"the question or prompt contains {smuggled[0]!r}, a control token of the model")
    return ids
