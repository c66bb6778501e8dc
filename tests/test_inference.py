"""Prompt rendering and generation on the tiny model, loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.schemas import Generation, MediaSource, Sampling, StoredRequest
from common.settings import load_settings
from worker.gpu.batch import generate_batch
from worker.gpu.model import LoadedModel, Prompt, load_model, render_prompt, resolve_attention

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def _frames(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(count)]


def _request(
    question: str, videos: int, images: int = 0, prompt: str | None = None, max_new_tokens: int = 12
) -> StoredRequest:
    source = MediaSource(kind="upload", location="unused")
    return StoredRequest(
        question=question,
        prompt=prompt,
        videos=[source] * videos,
        images=[source] * images,
        sampling=Sampling(),
        generation=Generation(max_new_tokens=max_new_tokens),
    )


def _direct(loaded: LoadedModel, text: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
    """What a plain, unbatched ``generate`` gives."""
    inputs = loaded.processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_model_loads_on_cpu_in_fp32_with_sdpa(loaded: LoadedModel) -> None:
    assert (loaded.device, loaded.dtype, loaded.attn_implementation) == ("cpu", "float32", "sdpa")
    assert loaded.model.dtype == torch.float32
    assert resolve_attention("auto", "cpu") == "sdpa"


def test_default_prompt_is_the_chat_template_with_all_frames_first(loaded: LoadedModel) -> None:
    videos = [_frames(2, 0), _frames(3, 1)]
    prompt = render_prompt(loaded.processor, _request("Same thing?", videos=2), videos, [])
    assert prompt.text == "<|im_start|>user\n" + "<image>" * 5 + "\nSame thing?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.images == videos[0] + videos[1]


def test_a_custom_prompt_interleaves_media_in_the_users_order(loaded: LoadedModel) -> None:
    videos = [_frames(2, 0), _frames(1, 1)]
    still = _frames(1, 2)
    request = _request("Which one?", videos=2, images=1, prompt="First <video>, then <image>, last <video>.")
    prompt = render_prompt(loaded.processor, request, videos, still)
    assert prompt.text == (
        "<|im_start|>user\nFirst <image><image>, then <image>, last <image>.\nWhich one?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.images == videos[0] + still + videos[1]


def test_batched_greedy_answers_equal_unbatched_ones(loaded: LoadedModel) -> None:
    """1, 3, 6 and 12 frames with different max_new_tokens in one batch: each gets its own tokens."""
    prompts = []
    for seed, (frames, max_new) in enumerate([(1, 7), (3, 20), (6, 3), (12, 15)]):
        images = _frames(frames, seed)
        text = render_prompt(loaded.processor, _request(f"question {seed}?", videos=1), [images], []).text
        prompts.append(Prompt(text=text, images=images, generation=Generation(max_new_tokens=max_new)))
    batched = generate_batch(loaded, prompts)
    for prompt, completion in zip(prompts, batched, strict=True):
        alone = _direct(loaded, prompt.text, prompt.images, prompt.generation.max_new_tokens)
        assert completion.token_ids == alone
        assert completion.text == loaded.processor.tokenizer.decode(alone, skip_special_tokens=True)
        assert completion.prompt_tokens == len(loaded.processor.tokenizer(prompt.text)["input_ids"]) + 728 * len(
            prompt.images
        )
    # Different images must give different answers, or equality above would prove little.
    assert len({tuple(c.token_ids[:3]) for c in batched}) > 1


def test_a_model_that_cannot_load_raises_one_clear_error(tmp_path: Path) -> None:
    from worker.gpu.model import ModelLoadError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"cannot load {missing}: "):
        load_model(load_settings({"VIDEOQA_MODEL": str(missing), "VIDEOQA_DEVICE": "cpu"}))
    with pytest.raises(ModelLoadError, match="VIDEOQA_DEVICE=cuda but no CUDA device is visible"):
        load_model(load_settings({"VIDEOQA_MODEL": str(missing), "VIDEOQA_DEVICE": "cuda"}))


def test_warm_up_generates_on_a_blank_frame(loaded: LoadedModel) -> None:
    from worker.gpu.model import warm_up

    (completion,) = warm_up(loaded)
    assert 1 <= completion.completion_tokens <= 2
    assert completion.prompt_tokens > 729


def _installed(site: Path, distribution: str, version: str) -> Path:
    """A distribution ``distribution`` that provides a module named ``flash_attn``, as flash-attn
    (2.x) and flash-attn-4 both do."""
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("flash_attn\n")
    (info / "RECORD").write_text(f"flash_attn/__init__.py,,\n{info.name}/METADATA,,\n")
    return site


@pytest.mark.service
@pytest.mark.parametrize(
    ("distribution", "version", "expected"),
    [("flash-attn-4", "4.0.0", "sdpa"), ("flash-attn", "2.7.4", "flash_attention_2")],
)
def test_auto_attention_takes_flash_attention_2_only_from_the_flash_attn_distribution(
    tmp_path: Path, distribution: str, version: str, expected: str
) -> None:
    """In a fresh interpreter that sees the package; CUDA is reported present (none is here), the
    one stand-in, since the check also asks for a CUDA device."""
    import os
    import subprocess
    import sys

    site = _installed(tmp_path / "site", distribution, version)
    script = (
        "import importlib.util, torch; torch.cuda.is_available = lambda: True\n"
        "from worker.gpu.model import resolve_attention\n"
        "assert importlib.util.find_spec('flash_attn') is not None\n"
        "print(resolve_attention('auto', 'cuda'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == expected


@pytest.mark.gpu
def test_on_cuda_the_model_loads_in_fp16_and_answers(tiny_model_dir: Path) -> None:
    from worker.gpu.model import warm_up

    loaded = load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cuda"}))
    assert loaded.model.dtype == torch.float16
    assert next(loaded.model.parameters()).is_cuda
    (completion,) = warm_up(loaded)
    assert 1 <= completion.completion_tokens <= 2
