#!/usr/bin/env bash
# The GPU benchmark on a fresh GPU machine: a virtual environment, the project installed from its
# PyPI pins (the worker extra: torch's default CUDA wheel, SDPA attention, no flash-attn to
# build), then `python -m bench.gpu --quick` (the 7B architecture with random weights: nothing is
# downloaded but the packages), printing everything. Needs Python 3.11+, an NVIDIA driver and
# network access to PyPI. Run from anywhere: bash bench/gpu_fresh_machine.sh [extra bench.gpu flags]
# Other settings: VIDEOQA_DTYPE=bfloat16 VIDEOQA_COMPILE=decode bash bench/gpu_fresh_machine.sh
set -euxo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VIDEOQA_BENCH_VENV:-$repo/.venv-gpu-bench}"
python3 --version
nvidia-smi || echo "nvidia-smi not found: the benchmark will say whether CUDA is visible"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -e "$repo[worker]"
"$venv/bin/python" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
PY
cd "$repo"
time "$venv/bin/python" -m bench.gpu --quick "$@"
