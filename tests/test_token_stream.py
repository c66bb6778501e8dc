"""The answer's text as it is generated: token texts per step, on the tiny model's byte-level
tokenizer and through a real batch (in this process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.schemas import Generation
from common.settings import load_settings
from worker.gpu.batch import BatchItem, Outcome, run_batch
from worker.gpu.model import LoadedModel, Prompt, load_model
from worker.gpu.token_stream import TokenStream

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


class Published:
    """What a TokenStream sends: one dict per round trip."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def __call__(self, texts: dict[str, str]) -> None:
        self.calls.append(dict(texts))

    def text(self, key: str) -> str:
        return "".join(call[key] for call in self.calls if key in call)


def test_characters_split_over_tokens_are_held_back_until_complete(loaded: LoadedModel) -> None:
    tokenizer = loaded.processor.tokenizer
    answer = "Ça fait 3 €, très bien 😀 — fin"
    ids = tokenizer.encode(answer, add_special_tokens=False)
    # The byte-level vocabulary spells the emoji and the euro sign byte by byte.
    assert any("\ufffd" in tokenizer.decode(ids[:cut]) for cut in range(1, len(ids)))
    published = Published()
    stream = TokenStream(tokenizer, loaded.eos_token_ids, published, every_s=0)  # each step's text at once
    eos = min(loaded.eos_token_ids)
    for token in [*ids, eos, ids[0], ids[1]]:  # after an eos, a finished row's padding
        stream.step({"job": token})
    assert published.text("job") == answer  # streamed as it came, not at the end
    assert len(published.calls) > 5
    stream.finish("job", tokenizer.decode(ids, skip_special_tokens=True))
    stream.close()
    assert published.text("job") == answer
    assert all("\ufffd" not in call["job"] for call in published.calls)


def test_a_row_generated_again_after_a_split_sends_nothing_twice(loaded: LoadedModel) -> None:
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    published = Published()
    stream = TokenStream(tokenizer, loaded.eos_token_ids, published)
    for token in ids[:3]:
        stream.step({"job": token})
    stream.restart(["job"])  # out of memory: the row starts over, in a smaller batch
    for token in ids:
        stream.step({"job": token})
    stream.finish("job", tokenizer.decode(ids))
    stream.close()
    assert published.text("job") == "one two three four"


def test_a_publish_that_fails_does_not_end_the_generation(loaded: LoadedModel) -> None:
    def unreachable(texts: dict[str, str]) -> None:
        raise ConnectionError("Redis is down")

    stream = TokenStream(loaded.processor.tokenizer, loaded.eos_token_ids, unreachable)
    stream.step({"job": loaded.processor.tokenizer.encode("a", add_special_tokens=False)[0]})
    stream.finish("job", "ab")
    stream.close()


def _item(loaded: LoadedModel, key: str, frames: int, seed: int, max_new_tokens: int) -> BatchItem:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(frames)]
    content = [{"type": "image"}] * frames + [{"type": "text", "text": f"question {seed}?"}]
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return BatchItem(key, Prompt(text=text, images=images, generation=Generation(max_new_tokens=max_new_tokens)))


def test_a_batch_publishes_once_per_step_and_each_jobs_texts_make_its_answer(loaded: LoadedModel) -> None:
    items = [
        _item(loaded, f"job{seed}", frames, seed, max_new)
        for seed, (frames, max_new) in enumerate([(1, 9), (2, 4), (1, 16)])
    ]
    published = Published()
    finished_with: dict[str, str] = {}

    def settled(outcome: Outcome) -> None:
        # Every token of a job is out before the job's outcome is handed over.
        finished_with[outcome.key] = published.text(outcome.key)

    stream = TokenStream(loaded.processor.tokenizer, loaded.eos_token_ids, published)
    outcomes = run_batch(loaded, items, on_outcome=settled, check_every_s=0, tokens=stream)
    stream.close()
    for item in items:
        completion = outcomes[item.key].completion
        assert completion is not None
        assert published.text(item.key) == completion.text == finished_with[item.key]
    # One round trip for all rows (at most one per step, fewer as texts gather between round
    # trips), never one per row, and at most one more per job for its answer's last text.
    assert len(published.calls) <= 16 + len(items)
    assert max(len(call) for call in published.calls) > 1
