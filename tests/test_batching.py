"""The batching function on the tiny model (in this process), and batch sizing.

Out-of-memory errors cannot be produced on a CPU on purpose, so those tests wrap the real
generate call and raise ``torch.OutOfMemoryError`` where CUDA would; cancellation is fed by a
callable here (the real worker reads the job's status, see test_gpu_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.schemas import Generation
from common.settings import load_settings
from worker.gpu.batch import (
    BatchItem,
    Outcome,
    default_batch_size,
    job_memory_bytes,
    kv_cache_bytes_per_token,
    run_batch,
)
from worker.gpu.model import Completion, LoadedModel, Prompt, generate_one_call, load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def _item(loaded: LoadedModel, key: str, frames: int, seed: int, max_new_tokens: int) -> BatchItem:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(frames)]
    content = [{"type": "image"}] * frames + [{"type": "text", "text": f"question {seed}?"}]
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return BatchItem(key, Prompt(text=text, images=images, generation=Generation(max_new_tokens=max_new_tokens)))


def _alone(loaded: LoadedModel, item: BatchItem) -> list[int]:
    prompt = item.prompt
    inputs = loaded.processor(text=[prompt.text], images=prompt.images, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=prompt.generation.max_new_tokens)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def mixed(loaded: LoadedModel) -> list[BatchItem]:
    """1, 3, 6 and 12 frames with 7, 20, 3 and 15 new tokens, as the batch would be queued."""
    return [
        _item(loaded, f"f{frames}", frames, seed, max_new)
        for seed, (frames, max_new) in enumerate([(12, 15), (1, 7), (6, 3), (3, 20)])
    ]


@pytest.fixture(scope="module")
def expected(loaded: LoadedModel, mixed: list[BatchItem]) -> dict[str, list[int]]:
    return {item.key: _alone(loaded, item) for item in mixed}


def test_each_job_of_a_mixed_batch_gets_its_unbatched_tokens_as_soon_as_it_is_done(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    handed_over: list[str] = []
    outcomes = run_batch(loaded, mixed, on_outcome=lambda outcome: handed_over.append(outcome.key), check_every_s=0)
    for key, tokens in expected.items():
        completion = outcomes[key].completion
        assert completion is not None and completion.token_ids == tokens
    assert len({tuple(tokens[:3]) for tokens in expected.values()}) > 1
    # Rows are handed over when they end (by max_new_tokens: 3, 7, 15, 20), not in batch order.
    assert handed_over == ["f6", "f1", "f12", "f3"]


def test_a_cancelled_row_stops_and_the_other_rows_keep_their_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    asked: list[list[str]] = []

    def cancelled(keys: list[str]) -> set[str]:
        asked.append(keys)
        return {"f3"} if len(asked) >= 4 else set()  # cancelled while its row is generating

    outcomes = run_batch(loaded, mixed, cancelled=cancelled, check_every_s=0)
    stopped = outcomes["f3"]
    assert stopped.cancelled and stopped.completion is None
    assert 0 < stopped.generated_tokens < 20
    for key in ("f1", "f6", "f12"):
        completion = outcomes[key].completion
        assert completion is not None and completion.token_ids == expected[key]


def test_a_job_cancelled_before_its_batch_starts_is_not_generated(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    calls: list[int] = []

    def counting(model: LoadedModel, prompts: list[Prompt], **kwargs: object) -> list[Completion]:
        calls.append(len(prompts))
        return generate_one_call(model, prompts, **kwargs)

    outcomes = run_batch(loaded, mixed[1:3], cancelled=lambda keys: {"f1"}, generate_fn=counting)
    assert outcomes["f1"] == Outcome("f1", cancelled=True)
    assert calls == [1]


def _oom_when(condition):
    """The real generate call, raising CUDA's out-of-memory error when ``condition(prompts)``."""
    calls: list[list[int]] = []

    def generate(model: LoadedModel, prompts: list[Prompt], **kwargs: object) -> list[Completion]:
        calls.append([len(prompt.images) for prompt in prompts])
        if condition(prompts):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.60 GiB")
        return generate_one_call(model, prompts, **kwargs)

    return generate, calls


def test_out_of_memory_splits_the_batch_into_halves_that_keep_their_tokens(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    generate, calls = _oom_when(lambda prompts: len(prompts) > 2)
    outcomes = run_batch(loaded, mixed, generate_fn=generate)
    # Sorted by length, then halved: the short prompts together, the long ones together.
    assert calls == [[1, 3, 6, 12], [1, 3], [6, 12]]
    for key, tokens in expected.items():
        completion = outcomes[key].completion
        assert completion is not None and completion.token_ids == tokens


def test_a_job_that_does_not_fit_alone_fails_with_resource_exhausted(
    loaded: LoadedModel, mixed: list[BatchItem], expected: dict[str, list[int]]
) -> None:
    generate, calls = _oom_when(lambda prompts: any(len(prompt.images) == 12 for prompt in prompts))
    ended: list[Outcome] = []
    outcomes = run_batch(loaded, mixed, generate_fn=generate, on_outcome=ended.append)
    assert calls == [[1, 3, 6, 12], [1, 3], [6, 12], [6], [12]]
    failed = outcomes["f12"]
    assert failed.completion is None and failed.error is not None
    assert failed.error.code == "resource_exhausted"
    for key in ("f1", "f3", "f6"):
        completion = outcomes[key].completion
        assert completion is not None and completion.token_ids == expected[key]
    assert sorted(outcome.key for outcome in ended) == sorted(expected)


def test_an_error_other_than_out_of_memory_is_not_split(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    def broken(model: LoadedModel, prompts: list[Prompt], **kwargs: object) -> list[Completion]:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_batch(loaded, mixed, generate_fn=broken)


def test_a_batch_past_its_deadline_ends_its_jobs_with_timeout(loaded: LoadedModel, mixed: list[BatchItem]) -> None:
    outcomes = run_batch(loaded, mixed[:2], deadline=0.0)
    assert {key: outcome.error.code for key, outcome in outcomes.items() if outcome.error} == {
        "f12": "timeout",
        "f1": "timeout",
    }


def test_the_default_batch_is_sized_from_the_kv_cache_of_a_12_frame_job(loaded: LoadedModel) -> None:
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    # The real model's shapes (shared reference): 32 layers, 32 KV heads of 128, 384 px / 14 px patches.
    real = LlavaConfig(
        text_config=Qwen2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14),
    )  # fmt: skip
    assert kv_cache_bytes_per_token(real, 2) == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    kv_only = (12 * 729 + 32 + 100) * kv_cache_bytes_per_token(real, 2)
    assert 4.6e9 < kv_only < 4.7e9
    # Prefill activations add about 15%: ~5.3 GB, so ~11 jobs next to the weights on an 80 GB H100.
    assert kv_only < job_memory_bytes(real, 2) < 1.2 * kv_only
    assert default_batch_size(loaded) == 8  # on the CPU the batch is bounded by time, not memory
