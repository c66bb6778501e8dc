"""How much of a GPU worker's time goes to anything but the model, under a full queue, with
prefetch off and on in the same run.

    python -m bench.host_overhead [--jobs 24] [--batch 4] [--frames 1-12] [--new-tokens 16-64]

A real GPU worker process (``worker/cli/stack.py``'s command; here the tiny model on the CPU, one
torch thread) gets ``--jobs`` jobs queued at once, as the CPU stage leaves them (frames stored as
PNGs in local storage, status ``queued_gpu``, one generate message each), with frame counts and
``max_new_tokens`` drawn from the ranges (a fixed seed: both runs get the same jobs). Once every
answer is written it reads, from the worker's log, the seconds its generate calls took
(``model_total_s``), and prints the share of the wall time, first message to last answer, spent
outside them: claiming, reading records, fetching and decoding frames, tokenising, writing
results. The target is at most 10% with prefetch on; on a GPU the model's time shrinks and the
same host work weighs more, which is what prefetch hides. Redis: ``bench.harness`` (database 14
unless ``VIDEOQA_BENCH_REDIS_URL`` says otherwise; it is flushed).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import flush, service_env
from bench.throughput import run, stored_frames
from common.settings import load_settings

MODEL_TOTAL = re.compile(r"model_total_s=([0-9.]+)")


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def model_seconds(log: Path) -> float:
    """The worker's last cumulative figure of seconds spent in generate calls."""
    found = MODEL_TOTAL.findall(log.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"the worker logged no batch; see {log}")
    return float(found[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=span, default=(1, 12), help="range of frames per job, e.g. 1-12")
    parser.add_argument("--new-tokens", type=span, default=(16, 64), help="range of max_new_tokens, e.g. 16-64")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frame_counts = [int(n) for n in rng.integers(args.frames[0], args.frames[1] + 1, args.jobs)]
    new_tokens = [int(n) for n in rng.integers(args.new_tokens[0], args.new_tokens[1] + 1, args.jobs)]

    with tempfile.TemporaryDirectory(prefix="videoqa-host-overhead-") as tmp:
        env = service_env(Path(tmp))
        settings = load_settings(env)
        media = []
        for number, count in enumerate(frame_counts):
            (job_media,) = stored_frames(settings, 1, count, prefix=f"bench/{number}")
            media.append(job_media)
        print(f"{args.jobs} jobs, {args.frames[0]}-{args.frames[1]} frames and {args.new_tokens[0]}-{args.new_tokens[1]} "
              f"new tokens each, batch {args.batch}, model {env['VIDEOQA_MODEL']} "
              f"({env['VIDEOQA_DEVICE']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']})")  # fmt: skip
        print(f"{'prefetch':<9} {'wall s':>7} {'model s':>8} {'outside model':>14} {'jobs/s':>7} {'tokens/s':>9}")
        for prefetch in ("false", "true"):
            log = Path(tmp) / f"worker-prefetch-{prefetch}.log"
            figures = run(env, settings, media, new_tokens, args.batch, log, {"VIDEOQA_PREFETCH": prefetch})
            busy = model_seconds(log)
            outside = 1 - busy / figures["wall_s"]
            print(
                f"{'on' if prefetch == 'true' else 'off':<9} {figures['wall_s']:>7.2f} {busy:>8.2f} {outside:>14.1%} "
                f"{figures['jobs_per_s']:>7.2f} {figures['tokens_per_s']:>9.1f}"
            )
            sys.stdout.flush()
            flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
