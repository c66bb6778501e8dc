"""The answer's text as it is generated: each step's new tokens of a batch, turned into each job's
new text and published in one round trip for all rows.

A row's text is its tokens decoded as the final answer is (``skip_special_tokens``, cut at the
first eos), and a token event carries only what that text gained since the last one. Each step
decodes only a short window, the tokens since the last text sent plus the ones before them as
context (a tokenizer may spell a token differently at the start of a text), so a step's cost does
not grow with the answer. Text that ends inside a character (a multi-byte character split over
tokens decodes to U+FFFD) is held back until it is complete; ``finish`` sends whatever of the
final answer is not sent yet, so a job's token texts always concatenate to exactly its answer.

Texts go out at most one round trip every ``PUBLISH_EVERY_S``, with what the steps produced
meanwhile (a watcher reads text, not tokens: 50 ms is below what a reader notices, and most steps
then spend nothing on Redis). ``finish`` sends at once, so a job's tokens are all in Redis before
its outcome is written; ``close`` sends what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Publish = Callable[[dict[str, str]], None]
INCOMPLETE = "\ufffd"
PUBLISH_EVERY_S = 0.05
# After a failed round trip (Redis out of reach), the next try waits this long, so an outage costs
# the batch one timeout every few seconds, not one every step.
RETRY_AFTER_S = 5.0


class TokenStream:
    def __init__(
        self, tokenizer: Any, eos_token_ids: set[int], publish: Publish, every_s: float = PUBLISH_EVERY_S
    ) -> None:
        self.tokenizer = tokenizer
        self.every_s = every_s
        self.last = 0.0
        self.pending: dict[str, str] = {}
        self.eos = eos_token_ids
        self.publish = publish
        self.tokens: dict[str, list[int]] = {}
        # Per job: where the context window starts, and where the text already sent ends.
        self.offsets: dict[str, tuple[int, int]] = {}
        self.sent: dict[str, str] = {}
        self.replay: dict[str, int] = {}  # characters sent before a restart, not to send again
        self.ended: set[str] = set()
        self.failing = False

    def close(self) -> None:
        """Publish what is pending."""
        self._send({}, now=True)

    def restart(self, keys: Iterable[str]) -> None:
        """The jobs ``keys`` generate again from their first token (a batch split after running
        out of memory): the text they repeat (greedy rows repeat their tokens) is not sent again."""
        for key in keys:
            self.tokens[key] = []
            self.offsets[key] = (0, 0)
            self.replay[key] = len(self.sent.get(key, ""))
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
            new = self._new_text(key, row)
            if new:
                texts[key] = new
        self._send(texts)

    def finish(self, key: str, answer: str) -> None:
        """The job's answer is complete: send what of it is not sent yet."""
        self.ended.add(key)
        sent = self.sent.get(key, "")
        rest = {}
        if answer.startswith(sent) and len(answer) > len(sent):
            self.sent[key] = answer
            rest = {key: answer[len(sent) :]}
        elif not answer.startswith(sent):
            log.warning("job %s: streamed text is not a prefix of its answer", key)
        self._send(rest, now=True)

    def _new_text(self, key: str, row: list[int]) -> str:
        context, read = self.offsets.get(key, (0, 0))
        decode = self.tokenizer.decode
        known = decode(row[context:read], skip_special_tokens=True)
        text = decode(row[context:], skip_special_tokens=True)
        if text.endswith(INCOMPLETE) or len(text) <= len(known) or not text.startswith(known):
            return ""
        new = text[len(known) :]
        self.offsets[key] = (read, len(row))
        repeated = min(self.replay.get(key, 0), len(new))
        if repeated:
            self.replay[key] -= repeated
            new = new[repeated:]
        self.sent[key] = self.sent.get(key, "") + new
        return new

    def _send(self, texts: dict[str, str], *, now: bool = False) -> None:
        for key, text in texts.items():
            self.pending[key] = self.pending.get(key, "") + text
        wait_s = RETRY_AFTER_S if self.failing else self.every_s
        if self.pending and ((now and not self.failing) or time.monotonic() >= self.last + wait_s):
            texts, self.pending = self.pending, {}
            self.last = time.monotonic()
            self._publish(texts)

    def _publish(self, texts: dict[str, str]) -> None:
        # Watchers are a convenience next to the answer itself: an unreachable Redis must not end
        # the batch (the result is written, or fails, on its own path).
        try:
            self.publish(texts)
        except Exception as exc:  # noqa: BLE001 - a failed publish must not fail the generation
            if not self.failing:
                log.warning("cannot publish token events (%s: %s); generation goes on", type(exc).__name__, exc)
                self.failing = True
            return
        if self.failing:
            log.info("token events can be published again")
            self.failing = False
