"""The answer's text as it is generated: each step's new tokens of a batch, turned into each job's
new text and published in one round trip for all rows.

A row's text is its tokens decoded as the final answer is (``skip_special_tokens``, cut at the
first eos), and a token event carries only what that text gained since the last one. Text that
ends inside a character (a multi-byte character split over tokens decodes to U+FFFD) or that
would rewrite what was already sent is held back until it settles; ``finish`` sends the rest of
the final answer, so a job's token texts always concatenate to exactly its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Publish = Callable[[dict[str, str]], None]
INCOMPLETE = "\ufffd"


class TokenStream:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], publish: Publish) -> None:
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.publish = publish
        self.tokens: dict[str, list[int]] = {}
        self.sent: dict[str, str] = {}
        self.ended: set[str] = set()
        self.failing = False

    def restart(self, keys: Iterable[str]) -> None:
        """The jobs ``keys`` generate again from their first token (a batch split after running
        out of memory); greedy rows repeat their tokens, so nothing is sent twice."""
        for key in keys:
            self.tokens[key] = []
            self.ended.discard(key)

    def step(self, new_tokens: dict[str, int]) -> None:
        """One generation step: job id -> the token its row just got."""
        texts: dict[str, str] = {}
        for key, token in new_tokens.items():
            if key in self.ended:
                continue
            if token in self.eos:
                self.ended.add(key)  # what follows an eos is padding
                continue
            row = self.tokens.setdefault(key, [])
            row.append(token)
            new = self._new_text(key, self.tokenizer.decode(row, skip_special_tokens=True))
            if new:
                texts[key] = new
        self._send(texts)

    def finish(self, key: str, answer: str) -> None:
        """The job's answer is complete: send what of it is not sent yet."""
        self.ended.add(key)
        sent = self.sent.get(key, "")
        if answer.startswith(sent) and len(answer) > len(sent):
            self.sent[key] = answer
            self._send({key: answer[len(sent) :]})
        elif not answer.startswith(sent):
            log.warning("job %s: streamed text is not a prefix of its answer", key)

    def _new_text(self, key: str, text: str) -> str:
        sent = self.sent.get(key, "")
        if text.endswith(INCOMPLETE) or len(text) <= len(sent) or not text.startswith(sent):
            return ""
        self.sent[key] = text
        return text[len(sent) :]

    def _send(self, texts: dict[str, str]) -> None:
        if not texts:
            return
        # Watchers are a convenience next to the answer itself: an unreachable Redis must not end
        # the batch (the result is written, or fails, on its own path).
        try:
            self.publish(texts)
        except Exception as exc:  # noqa: BLE001
            if not self.failing:
                log.warning("cannot publish token events (%s: %s); generation goes on", type(exc).__name__, exc)
                self.failing = True
            return
        if self.failing:
            log.info("token events can be published again")
            self.failing = False
