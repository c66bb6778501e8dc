"""In-flight batching on the tiny model (in this process): jobs join a running batch between decode
steps and leave it when done, and every answer is the job's solo answer token for token.

Out-of-memory errors cannot be produced on a CPU on purpose, so those tests wrap the real forward
pass and raise ``torch.OutOfMemoryError`` where CUDA would; cancellation and admission are fed by
callables here (the real worker reads the job's status and the queue).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from common.schemas import Generation
from common.settings import load_settings
from tests.test_token_stream import Published
from tests.tiny_jobs import frames, job, solo
from worker.gpu.batch import BatchItem, Outcome
from worker.gpu.inflight import run_inflight
from worker.gpu.kv_rows import RunningRows, model_forward, prefill
from worker.gpu.model import LoadedModel, load_model
from worker.gpu.prefix_cache import PrefixCache
from worker.gpu.token_stream import TokenStream

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


@pytest.fixture(scope="module")
def mixed(loaded: LoadedModel) -> list[BatchItem]:
    """12, 1, 6 and 3 frames with 15, 7, 3 and 20 new tokens."""
    cases = [(12, 15), (1, 7), (6, 3), (3, 20)]
    return [
        job(loaded, f"f{count}", frames(count, seed), f"question {seed}?", new)
        for seed, (count, new) in enumerate(cases)
    ]


@pytest.fixture(scope="module")
def expected(loaded: LoadedModel, mixed: list[BatchItem]) -> dict[str, list[int]]:
    return {item.key: solo(loaded, item) for item in mixed}


class Recorded:
    """The real forward pass, noting the rows of each decode step; ``fail(inputs)`` says when to
    raise CUDA's out-of-memory error instead."""

    def __init__(self, loaded: LoadedModel, fail: Callable[[dict[str, Any]], bool] = lambda inputs: False) -> None:
        self.forward = model_forward(loaded)
        self.fail = fail
        self.decode_rows: list[int] = []

    def __call__(self, **inputs: Any) -> Any:
        if self.fail(inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.60 GiB")
        if inputs["input_ids"].shape[1] == 1:
            self.decode_rows.append(inputs["input_ids"].shape[0])
        return self.forward(**inputs)


def _tokens(outcomes: dict[str, Outcome], key: str) -> list[int]:
    completion = outcomes[key].completion
    assert completion is not None, outcomes[key]
    return completion.token_ids


def test_rows_leave_when_done_and_every_job_gets_its_solo_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    handed_over: list[str] = []
    forward = Recorded(loaded)
    outcomes = run_inflight(loaded, mixed, on_outcome=lambda outcome: handed_over.append(outcome.key), forward=forward)
    for key, tokens in expected.items():
        assert _tokens(outcomes, key) == tokens
    assert len({tuple(tokens[:3]) for tokens in expected.values()}) > 1
    assert handed_over == ["f6", "f1", "f12", "f3"]
    # The first token comes from the prefill; a row of n tokens takes n - 1 decode steps and is
    # dropped after its last: 3 tokens, then 7, 15 and 20.
    assert forward.decode_rows == [4] * 2 + [3] * 4 + [2] * 8 + [1] * 5
    assert [outcomes[key].step for key in handed_over] == [2, 6, 14, 19]


def _arrives_at(call: int, *arriving: BatchItem) -> Callable[[int], list[BatchItem]]:
    """An admission callback that hands ``arriving`` over at its ``call``-th call."""
    calls: list[int] = []

    def admit(free_rows: int) -> list[BatchItem]:
        calls.append(free_rows)
        return list(arriving) if len(calls) == call else []

    return admit


@pytest.mark.parametrize("same_frames", [False, True], ids=["other-frames", "prefix-hit"])
def test_a_short_job_joins_a_long_batch_and_finishes_long_before_it(loaded: LoadedModel, same_frames: bool) -> None:
    long_frames = frames(3, 10)
    long_jobs = [
        job(loaded, "long-a", long_frames, "What is happening in this video?", 40),
        job(loaded, "long-b", frames(2, 11), "Describe the scene in detail.", 40),
    ]
    short = job(loaded, "short", long_frames if same_frames else frames(1, 12), "What colour is the car?", 4)
    ended: list[Outcome] = []
    prefixes = PrefixCache(256 * 2**20, loaded.model_id)
    outcomes = run_inflight(
        loaded, long_jobs, admit=_arrives_at(10, short), max_rows=4, on_outcome=ended.append, prefixes=prefixes
    )

    answers = {item.key: solo(loaded, item) for item in [*long_jobs, short]}
    for key, tokens in answers.items():
        assert _tokens(outcomes, key) == tokens
    assert ended[0].key == "short"
    # Admitted before the 10th step, done 3 steps later; a long job takes a step per token after
    # its first (up to 39, fewer where an eos comes first).
    assert outcomes["short"].step == 9 + 3
    for item in long_jobs:
        assert outcomes[item.key].step == len(answers[item.key]) - 1 > 9 + 3 + 20
    cached = outcomes["short"].completion.cached_tokens
    assert (cached >= 0.9 * outcomes["short"].completion.prompt_tokens) if same_frames else cached == 0


def test_admission_asks_for_the_free_rows_and_queued_jobs_wait_for_one(
    loaded: LoadedModel, mixed: list[BatchItem]
) -> None:
    asked: list[int] = []

    def admit(free_rows: int) -> list[BatchItem]:
        asked.append(free_rows)
        return [mixed[2]] if len(asked) == 1 else []

    forward = Recorded(loaded)
    outcomes = run_inflight(loaded, [mixed[1], mixed[3]], admit=admit, max_rows=2, forward=forward)
    assert asked[0] == 1  # asked only once a row was free
    assert max(forward.decode_rows) == 2  # the third job waited for a row
    for item in (mixed[1], mixed[2], mixed[3]):
        assert _tokens(outcomes, item.key) == solo(loaded, item)
    # f1 (7 tokens) left after 6 steps, and f6 (3 tokens) took its row: done 2 steps later.
    assert outcomes["f6"].step == 6 + 2
    # Asked at every step boundary with a free row; the last time, every row was free and
    # nothing came, so the run ended.
    assert set(asked[:-1]) == {1} and asked[-1] == 2


def test_a_cancelled_row_stops_and_the_others_keep_their_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    asked: list[list[str]] = []

    def cancelled(keys: list[str]) -> set[str]:
        asked.append(keys)
        return {"f3"} if len(asked) >= 4 else set()

    outcomes = run_inflight(loaded, mixed, cancelled=cancelled, check_every_s=0)
    stopped = outcomes["f3"]
    assert stopped.cancelled and stopped.completion is None
    assert 0 < stopped.generated_tokens < 20
    for key in ("f1", "f6", "f12"):
        assert _tokens(outcomes, key) == expected[key]


def test_jobs_past_their_deadline_end_with_timeout(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    late = BatchItem("late", mixed[1].prompt, deadline=0.0)
    outcomes = run_inflight(loaded, [late, mixed[2]])
    assert outcomes["late"].error is not None and outcomes["late"].error.code == "timeout"
    assert _tokens(outcomes, "f6") == solo(loaded, mixed[2])
    everyone = run_inflight(loaded, mixed[:2], deadline=0.0)
    assert {key: outcome.error.code for key, outcome in everyone.items() if outcome.error} == {
        "f12": "timeout",
        "f1": "timeout",
    }


def test_out_of_memory_in_a_step_sends_the_newest_rows_back_and_they_keep_their_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    """The error comes from the last decoder layer, after the others have grown the cache: the
    step is undone, and half of the rows go on."""

    def too_many_rows(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > 2 and hidden.shape[1] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.60 GiB")

    forward = Recorded(loaded)
    published = Published()
    stream = TokenStream(loaded.processor.tokenizer, loaded.eos_token_ids, published)
    hook = loaded.model.model.language_model.layers[-1].register_forward_pre_hook(too_many_rows, with_kwargs=True)
    try:
        outcomes = run_inflight(loaded, mixed, forward=forward, tokens=stream)
    finally:
        hook.remove()
    stream.close()
    for key, tokens in expected.items():
        completion = outcomes[key].completion
        assert completion is not None and completion.token_ids == tokens
        # Rows that started again did not send their text twice.
        assert published.text(key) == completion.text
    # One step of 4 rows failed; from then on at most 2 rows at a time.
    assert forward.decode_rows[0] == 4 and max(forward.decode_rows[1:]) == 2


def test_a_merge_that_fails_leaves_the_running_rows_as_they_were(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    forward = model_forward(loaded)
    rows = RunningRows(forward)
    with torch.inference_mode():
        for item in mixed[1:3]:
            rows.join(prefill(loaded, item.prompt.encoded, forward))
        before = [(layer.keys.clone(), layer.values.clone()) for layer in rows.cache.layers]
        mask = rows.mask.clone()
        broken = prefill(loaded, mixed[3].prompt.encoded, forward)
        # Its last layer cannot be merged (a real error from torch.cat, after the first layer merged).
        last = broken.cache.layers[-1]
        last.keys = last.keys[:, :1]
        with pytest.raises(RuntimeError):
            rows.join(broken)
    assert torch.equal(rows.mask, mask)
    for layer, (keys, values) in zip(rows.cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_job_that_does_not_fit_alone_fails_with_resource_exhausted(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    def twelve_frames(inputs: dict[str, Any]) -> bool:
        pixels = inputs.get("pixel_values")
        return pixels is not None and pixels.shape[0] == 12

    ended: list[Outcome] = []
    outcomes = run_inflight(loaded, mixed, forward=Recorded(loaded, fail=twelve_frames), on_outcome=ended.append)
    failed = outcomes["f12"]
    assert failed.completion is None and failed.error is not None and failed.error.code == "resource_exhausted"
    for key in ("f1", "f3", "f6"):
        assert _tokens(outcomes, key) == expected[key]
    assert sorted(outcome.key for outcome in ended) == sorted(expected)


def test_an_error_other_than_out_of_memory_propagates(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    def broken(**inputs: Any) -> Any:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_inflight(loaded, mixed, forward=broken)


def test_a_sampling_job_shares_the_batch_and_greedy_rows_keep_their_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    sampled = job(
        loaded,
        "sampled",
        frames(2, 20),
        "question?",
        9,
        Generation(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.9),
    )
    forward = Recorded(loaded)
    torch.manual_seed(0)
    outcomes = run_inflight(loaded, [*mixed, sampled], forward=forward)
    for key, tokens in expected.items():
        assert _tokens(outcomes, key) == tokens
    assert 1 <= len(_tokens(outcomes, "sampled")) <= 9
    assert forward.decode_rows[0] == 5  # one batch, not one per setting


def test_each_jobs_streamed_texts_make_its_answer(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    published = Published()
    finished_with: dict[str, str] = {}

    def settled(outcome: Outcome) -> None:
        finished_with[outcome.key] = published.text(outcome.key)

    stream = TokenStream(loaded.processor.tokenizer, loaded.eos_token_ids, published)
    outcomes = run_inflight(loaded, mixed[:2], admit=_arrives_at(3, mixed[2]), on_outcome=settled, tokens=stream)
    stream.close()
    for item in mixed[:3]:
        completion = outcomes[item.key].completion
        assert completion is not None
        assert published.text(item.key) == completion.text == finished_with[item.key]
