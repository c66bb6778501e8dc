"""Compiled decoding (``VIDEOQA_COMPILE=decode``): a static KV cache and ``torch.compile`` of the
decoding step, through transformers' own path (``generate`` compiles the model's forward for the
steps after prefill when the cache is static; prefill, whose length varies, runs as usual).

A compiled graph holds for one set of shapes: the batch's rows and the cache's length. Both are
rounded up to a few buckets, so a worker compiles at most once per (rows, length) bucket, not per
request: rows to 1, 2, 4, 8, 16 or 32 (extra rows repeat the batch's last prompt, are ended from
their first step and dropped), and the cache to the prompt plus new tokens rounded up to a power
of two of at least 1024 tokens. The first batch of each bucket pays for its compilation (tens of
seconds on a GPU, minutes on a CPU); ``torch._dynamo``'s recompile limit is raised to the number
of buckets so that none falls back to uncompiled code.

Unmeasured without a GPU: docs/gpu-pipeline.md says how to measure it (``python -m bench.gpu``
with ``VIDEOQA_COMPILE=decode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_CACHE_TOKENS = 1024
MAX_CACHE_BUCKETS = 8  # 1024 .. 131072 tokens


def row_bucket(rows: int) -> int:
    """The smallest row bucket that holds ``rows`` (itself past the largest)."""
    return next((bucket for bucket in ROW_BUCKETS if bucket >= rows), rows)


def cache_bucket(tokens: int) -> int:
    """``tokens`` rounded up to a power of two, at least ``MIN_CACHE_TOKENS``."""
    bucket = MIN_CACHE_TOKENS
    while bucket < tokens:
        bucket *= 2
    return bucket


class _StopAt:
    """Ends every row at ``length`` tokens: ``max_length`` is the cache's bucket, not the answer's end."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool, device=input_ids.device
        )


class _RealRows:
    """The batch's own stopping criterion, shown only the real rows; padding rows are ended."""

    def __init__(self, inner: Any, rows: int) -> None:
        self.inner = inner
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.inner(input_ids[: self.rows], scores[: self.rows] if scores is not None else None, **kwargs)
        extra = torch.ones(input_ids.shape[0] - self.rows, dtype=torch.bool, device=input_ids.device)
        return torch.cat([torch.as_tensor(done, device=input_ids.device).reshape(-1), extra])


@dataclass
class CompiledDecoding:
    """What ``generate_one_call`` changes about a call when decoding is compiled."""

    config: Any  # transformers.CompileConfig

    @classmethod
    def create(cls) -> CompiledDecoding:
        import torch
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False)
        # transformers compiles on CUDA only by default; CPU is for tests. Typed None in its stubs.
        config._compile_all_devices = True  # type: ignore[assignment]
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, len(ROW_BUCKETS) * MAX_CACHE_BUCKETS
        )
        return cls(config)

    def apply(self, inputs: dict[str, Any], kwargs: dict[str, Any], images_per_row: list[int]) -> int:
        """Pad ``inputs`` to a row bucket and size the cache to a length bucket, in place; the
        number of real rows (the first ones of the output)."""
        import torch
        from transformers import StoppingCriteriaList

        rows = inputs["input_ids"].shape[0]
        padded = row_bucket(rows) - rows
        if padded:
            for name in ("input_ids", "attention_mask"):
                inputs[name] = torch.cat([inputs[name], inputs[name][-1:].expand(padded, -1)])
            last_images = images_per_row[-1]
            if last_images and "pixel_values" in inputs:
                tail = inputs["pixel_values"][-last_images:]
                inputs["pixel_values"] = torch.cat([inputs["pixel_values"], *([tail] * padded)])
        end = inputs["input_ids"].shape[1] + kwargs.pop("max_new_tokens")
        criteria = list(kwargs.pop("stopping_criteria", []))
        kwargs.update(
            max_length=cache_bucket(end),
            cache_implementation="static",
            compile_config=self.config,
            stopping_criteria=StoppingCriteriaList([*(_RealRows(c, rows) for c in criteria), _StopAt(end)]),
        )
        return rows
