"""The GPU benchmark's parts that run without a GPU: its comparison of batched answers with solo
ones, and a whole measurement on the tiny model on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.gpu import build, measure, same_as_solo

torch.set_num_threads(1)


def test_same_as_solo_counts_equal_answers_and_where_the_first_difference_starts() -> None:
    assert same_as_solo([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == "2/2"
    assert same_as_solo([[1, 2, 3], [4, 5, 6], [7]], [[1, 2, 3], [4, 9, 6], [8]]) == "1/3 (2 differ from new token 0)"
    assert same_as_solo([[1, 2, 3]], [[1, 2]]) == "0/1 (1 differs from new token 2)"


def test_the_benchmark_reports_batched_answers_equal_to_solo_ones_in_fp32_on_the_cpu(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = build("cpu", tiny_model_dir, "sdpa")
    measure(loaded, [3], None, "sdpa")
    rows = capsys.readouterr().out.splitlines()
    batching = next(row for row in rows if "worker batching" in row)
    assert batching.split()[-1] == "3/3", rows
