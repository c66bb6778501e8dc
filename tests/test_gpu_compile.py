"""Compiled decoding (``VIDEOQA_COMPILE=decode``): the buckets that bound recompilation, and on
the CPU a smoke test that compiled answers equal uncompiled ones. The smoke test compiles with
inductor (minutes on a loaded CPU), so it runs only when asked: ``VIDEOQA_TEST_COMPILE=1``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.schemas import Generation
from common.settings import load_settings
from tests.test_gpu_worker import frames, loaded  # noqa: F401 - a fixture
from worker.gpu.batch import BatchItem, run_batch
from worker.gpu.compiled import cache_bucket, row_bucket
from worker.gpu.model import LoadedModel, Prompt, encode_prompt, load_model

torch.set_num_threads(1)


def test_rows_and_cache_lengths_round_up_to_a_few_buckets() -> None:
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 32, 40)] == [1, 2, 4, 8, 8, 16, 32, 32, 40]
    assert [cache_bucket(n) for n in (1, 1024, 1025, 5000, 32768)] == [1024, 1024, 2048, 8192, 32768]
    # Every request of up to 32 rows and 32k tokens lands in one of 6 x 6 shapes.
    shapes = {(row_bucket(rows), cache_bucket(tokens)) for rows in range(1, 33) for tokens in range(1, 32769, 97)}
    assert len(shapes) == 36


@pytest.mark.skipif(
    not os.environ.get("VIDEOQA_TEST_COMPILE"), reason="compiles with inductor: set VIDEOQA_TEST_COMPILE=1"
)
@pytest.mark.timeout(1800)
def test_compiled_decoding_answers_as_uncompiled_on_the_cpu(tiny_model_dir: Path, loaded: LoadedModel) -> None:  # noqa: F811
    compiled = load_model(
        load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu", "VIDEOQA_COMPILE": "decode"})
    )
    assert compiled.compiled is not None

    def prompts(model: LoadedModel) -> list[Prompt]:
        made = []
        for seed, (count, new) in enumerate([(1, 5), (2, 9), (1, 3)]):  # 3 rows: padded to 4
            content = [{"type": "image"}] * count + [{"type": "text", "text": f"question {seed}?"}]
            text = model.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            prompt = Prompt(text=text, images=frames(count, seed), generation=Generation(max_new_tokens=new))
            prompt.encoded = encode_prompt(model, prompt)
            made.append(prompt)
        return made

    def answers(model: LoadedModel) -> dict[str, list[int]]:
        outcomes = run_batch(model, [BatchItem(str(n), p) for n, p in enumerate(prompts(model))])
        return {key: outcome.completion.token_ids for key, outcome in outcomes.items() if outcome.completion}

    assert answers(compiled) == answers(loaded)
