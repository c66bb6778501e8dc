"""GPU generation benchmark: the notebook's way (one ``generate`` per job, one job at a time)
against the GPU worker's batching path (``worker.gpu.batch.run_batch``), as shares of the roofline.

    python -m bench.gpu            # CUDA: the real architecture with random fp16 weights
                                   # no CUDA: the tiny model on the CPU (it says so)
    python -m bench.gpu --quick    # only the realistic mix (bench.gpu_mix), small: < 5 min on one H200
    python -m bench.gpu --mix      # the table below, then the realistic mix at full size
    VIDEOQA_DTYPE=bfloat16 VIDEOQA_COMPILE=decode python -m bench.gpu --quick   # other settings

On CUDA it builds LLaVA-Interleave-Qwen-7B's architecture from the values in the shared model
reference (Qwen2 7B text model, SigLIP so400m vision tower, 2-layer projector; 8.14 B parameters)
with random fp16 weights, so nothing is downloaded; the tokenizer and image processor are the
tiny model's, which tokenise like the real ones and give 729 tokens per 384x384 image. Each job
is 12 random 384x384 frames and a ~20-token question, and generates exactly 100 new tokens (no
token can end a row early: eos is set past the vocabulary). For batch 1, 2, 4, 8 and the largest
batch that fits (the worker's own sizing, lowered until no out-of-memory split happens), with
SDPA and with flash-attention 2 when it imports, it prints:

* prefill s: seconds to the first new token for the batch (the notebook's way: per job);
* decode tok/s: new tokens per second after the first, over the whole batch;
* jobs/s: jobs finished per second, from preprocessing to the last token;
* each as a share of the H100 roofline (3.0 TB/s, 800 dense fp16 TFLOP/s; arithmetic from the
  parameter counts, KV cache size and FLOPs, as in the reference), and the batching path's
  jobs/s over the notebook's way in the same run;
* = solo: how many of the batch's answers (100 greedy tokens each) equal the same job's answer
  generated alone the notebook's way, and where the first one that differs parts from it. fp32
  on the CPU gives all of them; in fp16 on CUDA the batch's shape changes the kernels' rounding,
  which can flip a greedy choice between two near-equal logits, and the answer follows that
  token from there on.

Targets on one H100: batched jobs/s at least 2x the notebook's way, and at least 60% of the
roofline. Without CUDA the roofline shares are not printed (they describe an H100).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.schemas import Generation
from common.settings import load_settings
from worker.gpu.batch import BatchItem, default_batch_size, kv_cache_bytes_per_token, run_batch, tokens_per_image
from worker.gpu.model import LoadedModel, Prompt, generate_one_call, load_model

FRAMES = 12
NEW_TOKENS = 100
BATCHES = (1, 2, 4, 8)
QUESTION = "Are these two cats in these videos doing the same thing, and what happens at the end of the clip in detail?"
QUESTION_WORDS = QUESTION.split()

# (HBM bytes/s, dense fp16 FLOP/s): the reference's H100 figures; H200 has 4.8/3.35 of its bandwidth.
PEAKS = {"H100": (3.0e12, 800e12), "H200": (3.0e12 * 4.8 / 3.35, 800e12)}


def reference_config(image_token_id: int) -> Any:
    """LLaVA-Interleave-Qwen-7B's architecture, from the shared reference (config.json values)."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=152000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, hidden_act="silu", tie_word_embeddings=False,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
    )  # fmt: skip
    # The tiny tokenizer's <image> id stands in for 151646; the architecture does not depend on it.
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=image_token_id, image_seq_length=729,
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )  # fmt: skip


def build(device: str, tiny_dir: Path, attn: str, environ: dict[str, str] | None = None) -> LoadedModel:
    """The model to measure; ``VIDEOQA_DTYPE`` and ``VIDEOQA_COMPILE`` from ``environ`` apply."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from worker.gpu.compiled import CompiledDecoding
    from worker.gpu.precision import resolve_dtype

    chosen = {k: v for k, v in (environ or {}).items() if k in ("VIDEOQA_DTYPE", "VIDEOQA_COMPILE")}
    settings = load_settings({"VIDEOQA_MODEL": str(tiny_dir), "VIDEOQA_DEVICE": device, **chosen})
    if device == "cpu":
        loaded = load_model(settings)
    else:
        dtype = resolve_dtype(settings.dtype, "cuda", attn)
        processor = LlavaProcessor.from_pretrained(tiny_dir)
        processor.tokenizer.padding_side = "left"
        config = reference_config(processor.tokenizer.convert_tokens_to_ids("<image>"))
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        model.eval()
        short = str(dtype).removeprefix("torch.")
        name = f"llava-interleave-qwen-7b architecture, random {short} weights"
        compiled = CompiledDecoding.create() if settings.compile == "decode" else None
        loaded = LoadedModel(model, processor, name, "cuda", short, attn, compiled=compiled)
    # Every job generates exactly NEW_TOKENS: no token id can be eos.
    loaded.model.generation_config.eos_token_id = loaded.model.config.text_config.vocab_size
    return loaded


def question_text(tokenizer: Any) -> str:
    words: list[str] = []
    for word in QUESTION_WORDS * 3:
        words.append(word)
        if len(tokenizer(" ".join(words))["input_ids"]) >= 20:
            break
    return " ".join(words)


def prompts(loaded: LoadedModel, count: int, new_tokens: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    question = question_text(loaded.processor.tokenizer)
    content = [{"type": "image"}] * FRAMES + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [
        Prompt(
            text=text,
            images=[Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(FRAMES)],
            generation=Generation(max_new_tokens=new_tokens),
        )
        for _ in range(count)
    ]


def _sync(loaded: LoadedModel) -> None:
    if loaded.device == "cuda":
        torch.cuda.synchronize()


class FirstToken:
    """A stopping criterion that stops nothing and notes when the first new token exists (the
    end of prefill). It wraps the worker's own criterion on the batching path."""

    def __init__(self, loaded: LoadedModel, inner: Any = None) -> None:
        self.loaded = loaded
        self.inner = inner
        self.at: float | None = None

    def bind(self, prompt_length: int, prompt_tokens: list[int]) -> None:
        self.inner.bind(prompt_length, prompt_tokens)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        if self.at is None:
            _sync(self.loaded)
            self.at = time.perf_counter()
        if self.inner is not None:
            return self.inner(input_ids, scores, **kwargs)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Timing:
    total_s: float  # from the first preprocessing to the last token of the last job
    prefill_s: float  # up to the first new token: summed over jobs one at a time, or the batch's
    decode_s: float  # after the first new token: summed over jobs one at a time, or the batch's
    tokens: list[list[int]] = field(default_factory=list)  # each job's new tokens, in job order


def same_as_solo(solo: list[list[int]], batched: list[list[int]]) -> str:
    """``7/8 (one differs from new token 37)``: batched answers equal to the job's solo answer."""
    same = sum(a == b for a, b in zip(solo, batched, strict=True))
    differing = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(solo, batched, strict=True)
        if a != b
    ]
    if not differing:
        return f"{same}/{len(solo)}"
    return f"{same}/{len(solo)} ({len(differing)} differ{'s' if len(differing) == 1 else ''} from new token {min(differing)})"


def seed_way(loaded: LoadedModel, jobs: list[Prompt]) -> Timing:
    """The notebook: processor and ``generate`` for each job, one after the other."""
    from transformers import StoppingCriteriaList

    processor, model = loaded.processor, loaded.model
    prefill = decode = 0.0
    tokens = []
    _sync(loaded)
    started = time.perf_counter()
    for prompt in jobs:
        job_started = time.perf_counter()
        first = FirstToken(loaded)
        inputs = processor(text=[prompt.text], images=prompt.images, return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            output = model.generate(
                **inputs, do_sample=False, max_new_tokens=prompt.generation.max_new_tokens,
                pad_token_id=loaded.pad_token_id, stopping_criteria=StoppingCriteriaList([first]),
            )  # fmt: skip
        _sync(loaded)
        ended = time.perf_counter()
        assert (
            first.at is not None and output.shape[1] - inputs["input_ids"].shape[1] == prompt.generation.max_new_tokens
        )
        prefill += first.at - job_started
        decode += ended - first.at
        tokens.append(output[0, inputs["input_ids"].shape[1] :].tolist())
    return Timing(time.perf_counter() - started, prefill, decode, tokens)


class SplitHappened(Exception):
    """The batch did not fit in one call (the batching path split it on out-of-memory)."""


def batched_way(loaded: LoadedModel, jobs: list[Prompt]) -> Timing:
    """The GPU worker's path: one ``run_batch`` over all the jobs."""
    calls: list[FirstToken] = []

    def generate(model: LoadedModel, batch: list[Prompt], **kwargs: Any) -> list[Any]:
        calls.append(FirstToken(loaded, kwargs.pop("watch")))
        return generate_one_call(model, batch, watch=calls[-1], **kwargs)

    _sync(loaded)
    started = time.perf_counter()
    outcomes = run_batch(loaded, [BatchItem(str(i), prompt) for i, prompt in enumerate(jobs)], generate_fn=generate)
    _sync(loaded)
    ended = time.perf_counter()
    if len(calls) != 1:
        raise SplitHappened(f"a batch of {len(jobs)} ran in {len(calls)} calls")
    completions = [outcomes[str(i)].completion for i in range(len(jobs))]  # outcomes come in finishing order
    for prompt, completion in zip(jobs, completions, strict=True):
        assert completion is not None and completion.completion_tokens == prompt.generation.max_new_tokens
    first = calls[0].at
    assert first is not None
    return Timing(ended - started, first - started, ended - first, [c.token_ids for c in completions if c is not None])


@dataclass
class Roofline:
    """What one GPU could do at best, from the model's shapes (see the shared reference)."""

    prefill_s_per_job: float
    weight_bytes_per_step: float
    kv_bytes_per_job_step: float
    bandwidth: float

    @classmethod
    def of(cls, loaded: LoadedModel, bandwidth: float, flops: float) -> Roofline:
        model, config = loaded.model, loaded.model.config
        text = config.text_config
        per_image = tokens_per_image(config)
        prompt_tokens = FRAMES * per_image + 20 + 10  # frames, question, chat template

        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        vision = count(model.model.vision_tower)
        projector = count(model.model.multi_modal_projector)
        embedding = model.get_input_embeddings().weight.numel()
        head = model.lm_head.weight.numel()
        core = count(model.model.language_model) - embedding
        vision_cfg = config.vision_config
        prefill_flops = (
            2 * (vision + projector) * per_image * FRAMES
            + 4 * vision_cfg.num_hidden_layers * vision_cfg.hidden_size * per_image**2 * FRAMES
            + 2 * core * prompt_tokens
            + 2 * text.num_hidden_layers * text.hidden_size * prompt_tokens**2  # causal attention
        )
        dtype_bytes = model.dtype.itemsize
        kv = kv_cache_bytes_per_token(config, dtype_bytes) * (prompt_tokens + NEW_TOKENS / 2)
        return cls(prefill_flops / flops, (core + head) * dtype_bytes, kv, bandwidth)

    def step_s(self, batch: int) -> float:
        return (self.weight_bytes_per_step + batch * self.kv_bytes_per_job_step) / self.bandwidth

    def prefill_s(self, batch: int) -> float:
        return batch * self.prefill_s_per_job

    def decode_tokens_per_s(self, batch: int) -> float:
        return batch / self.step_s(batch)

    def jobs_per_s(self, batch: int) -> float:
        return batch / (self.prefill_s(batch) + NEW_TOKENS * self.step_s(batch))


def _share(value: float, best: float) -> str:
    return f"{value / best:5.0%}"


def measure(loaded: LoadedModel, batches: list[int], roofline: Roofline | None, attn: str) -> None:
    # First calls pay for kernel selection and allocator growth.
    seed_way(loaded, prompts(loaded, 1, 2))
    batched_way(loaded, prompts(loaded, 2, 2))
    for batch in batches:
        jobs = prompts(loaded, batch, NEW_TOKENS, seed=batch)
        seed = seed_way(loaded, jobs)
        try:
            batched = batched_way(loaded, jobs)
        except (SplitHappened, torch.OutOfMemoryError) as exc:
            print(f"{attn:<17} batch {batch:>3}: does not fit ({exc})")
            continue
        # The notebook's prefill is per job (one at a time); the batch's covers all its jobs.
        rows = (
            ("notebook", seed, seed.prefill_s / batch, 1, "", ""),
            ("worker batching", batched, batched.prefill_s, batch, f"{seed.total_s / batched.total_s:.2f}x",
             same_as_solo(seed.tokens, batched.tokens)),
        )  # fmt: skip
        for way, timing, prefill_shown, prefill_jobs, ratio, same in rows:
            decode = batch * (NEW_TOKENS - 1) / timing.decode_s
            jobs_per_s = batch / timing.total_s
            print(
                f"{attn:<17} {way:<16} {batch:>5} "
                f"{prefill_shown:>9.3f} {_share(roofline.prefill_s(prefill_jobs), prefill_shown) if roofline else '  n/a'} "
                f"{decode:>10.1f} {_share(decode, roofline.decode_tokens_per_s(batch)) if roofline else '  n/a'} "
                f"{jobs_per_s:>8.3f} {_share(jobs_per_s, roofline.jobs_per_s(batch)) if roofline else '  n/a'} "
                f"{ratio:>8} {same}"
            )
        sys.stdout.flush()


def largest_batch(loaded: LoadedModel) -> int:
    """The worker's own sizing, lowered until a batch runs in one call."""
    batch = default_batch_size(loaded)
    while batch > max(BATCHES):
        try:
            batched_way(loaded, prompts(loaded, batch, 2))
            return batch
        except (SplitHappened, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
            batch -= 1
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="the realistic mix only, small (under 5 minutes on one H200)"
    )
    parser.add_argument("--mix", action="store_true", help="also the realistic mix (bench.gpu_mix), full size")
    args = parser.parse_args()
    import os

    from bench.gpu_mix import print_mix
    from worker.fixtures.tiny_model import build_tiny_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
        print(
            "no CUDA device: running the tiny random-weight model on the CPU (1 thread); roofline shares are for an H100"
        )
    from transformers.utils import is_flash_attn_2_available

    attns = ["sdpa"]
    if cuda and is_flash_attn_2_available():
        attns.append("flash_attention_2")
    elif cuda:
        print("flash-attn is not installed: SDPA only (pip install -e '.[gpu]' adds it)")
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny")
        loaded = build(device, tiny, attns[0], dict(os.environ))
        params = sum(p.numel() for p in loaded.model.parameters())
        roofline = None
        if cuda:
            name = torch.cuda.get_device_name(0)
            known = next((key for key in PEAKS if key in name), None)
            bandwidth, flops = PEAKS[known or "H100"]
            roofline = Roofline.of(loaded, bandwidth, flops)
            print(
                f"{name}: roofline of {known or 'an H100 (this GPU is not in the table)'}: "
                f"{roofline.prefill_s_per_job:.3f} s prefill/job, {roofline.step_s(1) * 1e3:.1f} ms/step at batch 1"
            )
        print(f"model: {loaded.model_id} ({params / 1e9:.3g} B parameters, {loaded.dtype}, {loaded.attn_implementation}, "
              f"compile {'decode' if loaded.compiled else 'off'})")  # fmt: skip
        if args.quick:
            print_mix(loaded, Path(tmp), count=24 if cuda else 8, batch=8 if cuda else 4, videos=6,
                      solo=8, first_token=FirstToken, same_as_solo=same_as_solo)  # fmt: skip
            return 0
        print(f"{FRAMES} frames of 384x384 + ~20-token question, {NEW_TOKENS} new tokens per job")
        batches = list(BATCHES)
        largest = largest_batch(loaded) if cuda else default_batch_size(loaded)
        if largest not in batches:
            batches.append(largest)
        print(f"{'attention':<17} {'way':<16} {'batch':>5} {'prefill s':>9} {'share':>5} "
              f"{'decode t/s':>10} {'share':>5} {'jobs/s':>8} {'share':>5} {'vs nb':>8} = solo")  # fmt: skip
        for attn in attns:
            if attn != loaded.attn_implementation:
                loaded.model.set_attn_implementation(attn)
                loaded.attn_implementation = attn
            measure(loaded, batches, roofline, attn)
        if args.mix:
            print_mix(loaded, Path(tmp), count=96 if cuda else 16, batch=largest, videos=12,
                      solo=16, first_token=FirstToken, same_as_solo=same_as_solo)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
