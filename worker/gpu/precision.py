"""The dtype the model runs in (``VIDEOQA_DTYPE``), and the combinations that cannot work.

``auto`` is float16 on CUDA, as the product specifies, and float32 on the CPU (where greedy batched
answers equal solo ones token for token). The trade-off, for an operator (docs/gpu-pipeline.md):
the served checkpoint is stored in bfloat16; float16 has more mantissa bits (answers closer to
float32) but a narrow range, in which Qwen activations can overflow to inf/NaN on long prompts;
bfloat16 has float32's range and never overflows where float32 would not, at the cost of answers
less close to float32's (and than float16's) in greedy near-ties.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("float16", "bfloat16", "float32")


def check_combination(dtype: str, device: str, attn_implementation: str) -> str | None:
    """Why ``dtype`` cannot run with this device and attention setting, or None. ``device`` may
    still be ``auto`` (settings are checked before CUDA is asked)."""
    if dtype == "float16" and device == "cpu":
        return "VIDEOQA_DTYPE=float16 is not supported on the CPU (its float16 kernels are incomplete and slow); use float32 or bfloat16"
    if dtype == "float32" and attn_implementation == "flash_attention_2":
        return (
            "VIDEOQA_ATTN_IMPLEMENTATION=flash_attention_2 runs only in float16 or bfloat16, not VIDEOQA_DTYPE=float32"
        )
    return None


def resolve_dtype(setting: str, device: str, attn_implementation: str = "auto") -> Any:
    """The torch dtype for ``setting`` on a resolved ``device`` (``cuda`` or ``cpu``). Raises
    ``ValueError`` for a combination that cannot run (the model loader reports it)."""
    import torch

    name = setting if setting != "auto" else ("float16" if device.startswith("cuda") else "float32")
    if name not in DTYPES:
        raise ValueError(f"VIDEOQA_DTYPE must be one of auto, {', '.join(DTYPES)}; got {setting!r}")
    problem = check_combination(name, "cpu" if device == "cpu" else "cuda", attn_implementation)
    if problem:
        raise ValueError(problem)
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError("VIDEOQA_DTYPE=bfloat16 needs a GPU with bfloat16 support (compute capability 8.0 or later)")
    return getattr(torch, name)
