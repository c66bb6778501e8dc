"""The visual-prefix KV cache on the tiny model (in this process): a second question over the
same frames skips their prefill and still gets its solo answer; the byte bound; no hit for
other pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.settings import load_settings
from tests.tiny_jobs import frames, job, solo
from worker.gpu.inflight import run_inflight
from worker.gpu.model import LoadedModel, load_model
from worker.gpu.prefix_cache import PrefixCache, default_prefix_cache_bytes, visual_prefix_length

torch.set_num_threads(1)
BOUND = 256 * 2**20


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def _answer(loaded: LoadedModel, prefixes: PrefixCache, item):
    completion = run_inflight(loaded, [item], prefixes=prefixes)[item.key].completion
    assert completion is not None
    return completion


def test_a_second_question_over_the_same_frames_reuses_their_prefix_and_keeps_its_solo_answer(
    loaded: LoadedModel,
) -> None:
    prefixes = PrefixCache(BOUND, loaded.model_id)
    images = frames(3, 0)
    first = job(loaded, "first", images, "What is happening in this video?", 12)
    second = job(loaded, "second", images, "How many people are walking in the street?", 12)

    done_first = _answer(loaded, prefixes, first)
    done_second = _answer(loaded, prefixes, second)

    assert done_first.token_ids == solo(loaded, first) and done_first.cached_tokens == 0
    assert done_second.token_ids == solo(loaded, second)
    assert done_second.prompt_tokens == len(second.prompt.encoded.input_ids)
    assert done_second.cached_tokens >= 0.9 * done_second.prompt_tokens
    # Exactly the tokens through the last frame's run: the question is prefilled on its own.
    image_id = loaded.image_token_id
    assert done_second.cached_tokens == visual_prefix_length(second.prompt.encoded.input_ids, image_id)
    assert (prefixes.hits, prefixes.misses, len(prefixes.entries)) == (1, 1, 1)
    assert done_first.token_ids != done_second.token_ids  # different questions, different answers


def test_the_same_text_over_other_pixels_is_never_served_from_the_cache(loaded: LoadedModel) -> None:
    prefixes = PrefixCache(BOUND, loaded.model_id)
    question = "What is happening in this video?"
    _answer(loaded, prefixes, job(loaded, "a", frames(2, 1), question, 8))
    other = job(loaded, "b", frames(2, 2), question, 8)
    # Same token ids, other pixels.
    assert other.prompt.encoded.input_ids == job(loaded, "a", frames(2, 1), question, 8).prompt.encoded.input_ids

    completion = _answer(loaded, prefixes, other)

    assert completion.cached_tokens == 0 and prefixes.hits == 0
    assert completion.token_ids == solo(loaded, other)
    assert len(prefixes.entries) == 2


def test_entries_are_evicted_least_recently_used_first_within_the_byte_bound(loaded: LoadedModel) -> None:
    sizing = PrefixCache(BOUND, loaded.model_id)
    _answer(loaded, sizing, job(loaded, "size", frames(1, 3), "q?", 2))
    one_frame = sizing.bytes  # every one-frame prefix of this template is the same length
    prefixes = PrefixCache(int(2.5 * one_frame), loaded.model_id)
    sets = {name: frames(1, seed) for name, seed in (("a", 3), ("b", 4), ("c", 5))}
    _answer(loaded, prefixes, job(loaded, "a1", sets["a"], "first?", 2))
    _answer(loaded, prefixes, job(loaded, "b1", sets["b"], "first?", 2))
    # "a" used again: "b" is now the least recently used, and goes when "c" comes.
    assert _answer(loaded, prefixes, job(loaded, "a2", sets["a"], "second?", 2)).cached_tokens > 0
    _answer(loaded, prefixes, job(loaded, "c1", sets["c"], "first?", 2))
    assert prefixes.bytes <= prefixes.max_bytes and len(prefixes.entries) == 2

    late_b = job(loaded, "b2", sets["b"], "second?", 6)
    again_b = _answer(loaded, prefixes, late_b)
    assert again_b.cached_tokens == 0 and again_b.token_ids == solo(loaded, late_b)
    assert _answer(loaded, prefixes, job(loaded, "c2", sets["c"], "second?", 2)).cached_tokens > 0


def test_a_hit_leaves_the_cached_keys_and_values_as_they_were(loaded: LoadedModel) -> None:
    prefixes = PrefixCache(BOUND, loaded.model_id)
    images = frames(2, 6)
    _answer(loaded, prefixes, job(loaded, "a", images, "first?", 4))
    (entry,) = prefixes.entries.values()
    before = [(keys.clone(), values.clone()) for keys, values in entry.layers]

    second = job(loaded, "b", images, "And then what happens?", 10)
    assert (
        run_inflight(loaded, [second, job(loaded, "c", frames(1, 7), "other?", 6)], prefixes=prefixes)[
            "b"
        ].completion.cached_tokens
        > 0
    )

    for (keys, values), (old_keys, old_values) in zip(entry.layers, before, strict=True):
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)


def test_a_bound_of_zero_keeps_nothing(loaded: LoadedModel) -> None:
    prefixes = PrefixCache(0, loaded.model_id)
    images = frames(1, 8)
    _answer(loaded, prefixes, job(loaded, "a", images, "first?", 2))
    second = job(loaded, "b", images, "second?", 6)
    completion = _answer(loaded, prefixes, second)
    assert completion.cached_tokens == 0 and not prefixes.entries
    assert completion.token_ids == solo(loaded, second)
    assert default_prefix_cache_bytes("cpu", 10**12) == 256 * 2**20
    assert default_prefix_cache_bytes("cuda", 100 * 2**30) == 20 * 2**30


def test_a_follow_up_whose_history_holds_the_frames_reuses_the_first_jobs_prefix(loaded: LoadedModel) -> None:
    """The first question puts the frames first in its turn; the follow-up's history repeats that
    turn (its ``<video>`` placeholder), so both prompts start with the same tokens and frames."""
    from dataclasses import replace

    from common.schemas import Generation, MediaSource, Sampling, StoredRequest, Turn
    from worker.gpu.batch import BatchItem
    from worker.gpu.model import device_pixels, encode_prompt, render_prompt

    images = frames(2, 9)
    source = MediaSource(kind="upload", location="unused")

    def prepared(key: str, question: str, history: list[Turn]) -> BatchItem:
        request = StoredRequest(
            question=question, prompt=None, videos=[source], images=[], sampling=Sampling(),
            generation=Generation(max_new_tokens=10), history=history,
        )  # fmt: skip
        prompt = render_prompt(loaded.processor, request, [images], [])
        return BatchItem(key, replace(prompt, encoded=encode_prompt(loaded, prompt)))

    prefixes = PrefixCache(BOUND, loaded.model_id)
    first = prepared("first", "What is the cat doing?", [])
    answer = _answer(loaded, prefixes, first)
    history = [
        Turn(role="user", content="<video>\nWhat is the cat doing?"),
        Turn(role="assistant", content=answer.text),
    ]
    follow_up = prepared("follow-up", "And then?", history)
    completion = _answer(loaded, prefixes, follow_up)

    assert completion.cached_tokens == visual_prefix_length(first.prompt.encoded.input_ids, loaded.image_token_id)
    assert completion.cached_tokens >= 0.9 * completion.prompt_tokens
    encoded = follow_up.prompt.encoded
    assert encoded is not None
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=torch.tensor([encoded.input_ids]), attention_mask=torch.ones(1, len(encoded.input_ids), dtype=torch.long),
            pixel_values=device_pixels(loaded, encoded), do_sample=False, max_new_tokens=10,
        )  # fmt: skip
    assert completion.token_ids == output[0, len(encoded.input_ids) :].tolist()
