"""How many tokens a job can take in the model, known before any frame is decoded.

A job's prompt holds ``image_tokens`` per frame and per still image, its text and the chat turn
around them; generation adds up to ``max_new_tokens``. All of it must fit both the model's context
and the per-job budget the GPU workers' memory is sized for: a job past either would otherwise
reach a batch, fail there with an out-of-memory error, and split that batch on its way to failing
alone. The API checks the bound it knows at submission (``num_frames`` per video, which ``fps``
sampling never exceeds either); the CPU worker checks the frames it really sampled before the job
reaches a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InvalidRequest
from common.settings import Settings

# The turn around the user's content (``<|im_start|>user\n``, ``\n``, ``<|im_end|>\n``,
# ``<|im_start|>assistant\n``): 20 tokens at most, rounded up for other chat templates.
TURN_TOKENS = 32


def text_token_bound(text: str) -> int:
    """At most one token per UTF-8 byte: a byte-level BPE tokenizer (this model's) never needs more,
    and text that looks like a special token costs no more than its bytes either."""
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class JobSize:
    images: int  # sampled frames and still images
    image_tokens: int
    text_tokens: int
    new_tokens: int

    @property
    def total(self) -> int:
        return self.images * self.image_tokens + self.text_tokens + self.new_tokens

    def describe(self) -> str:
        return (
            f"{self.images} frames and images x {self.image_tokens} + {self.text_tokens} text "
            f"+ {self.new_tokens} new tokens"
        )


def job_size(
    question: str,
    prompt: str | None,
    images: int,
    max_new_tokens: int,
    settings: Settings,
    *,
    history: Sequence[str] = (),
) -> JobSize:
    """``history``: the text of each earlier turn, every one with its own turn markup."""
    text = text_token_bound(question) + text_token_bound(prompt or "") + TURN_TOKENS
    text += sum(text_token_bound(turn) + TURN_TOKENS for turn in history)
    return JobSize(images=images, image_tokens=settings.image_tokens, text_tokens=text, new_tokens=max_new_tokens)


def size_problem(size: JobSize, settings: Settings) -> str | None:
    """Why the job cannot run, naming the estimate and the limit it exceeds; None when it fits."""
    limit, reason = min(
        (settings.context_tokens, "the model's context"),
        (settings.max_job_tokens, "the per-job budget of the GPU workers"),
    )
    if size.total <= limit:
        return None
    return f"the job needs up to {size.total} tokens ({size.describe()}); the limit is {limit} ({reason})"


def check_sampled_size(
    question: str,
    prompt: str | None,
    images: int,
    max_new_tokens: int,
    settings: Settings,
    *,
    history: Sequence[str] = (),
) -> None:
    """Raise ``InvalidRequest`` when the frames and images a job really has do not fit."""
    problem = size_problem(job_size(question, prompt, images, max_new_tokens, settings, history=history), settings)
    if problem is not None:
        raise InvalidRequest(problem)
