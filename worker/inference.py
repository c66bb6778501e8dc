"""LLaVA-Interleave behind a small interface: load once, render prompts, generate in batches.

Batched greedy generation uses left padding, the attention mask and the pad token, which gives
every prompt exactly the tokens it would get alone.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from common.schemas import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Generation, StoredRequest
from common.settings import Settings

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    device: str
    dtype: str
    attn_implementation: str

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)


@dataclass
class Prompt:
    text: str
    images: list[Image.Image]
    generation: Generation = field(default_factory=Generation)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("VIDEOQA_DEVICE=cuda but no CUDA device is visible")
    return setting


def resolve_attention(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(settings: Settings) -> LoadedModel:
    """Load model and processor from a hub id or a local folder (fp16 on CUDA, fp32 on CPU)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would flood the worker's log
    device = resolve_device(settings.device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    attn = resolve_attention(settings.attn_implementation, device)
    processor = LlavaProcessor.from_pretrained(settings.model)
    # Left padding is what keeps batched greedy answers equal to unbatched ones.
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(settings.model, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    log.info("loaded %s on %s (%s, %s)", settings.model, device, dtype, attn)
    return LoadedModel(
        model=model,
        processor=processor,
        model_id=settings.model,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        attn_implementation=attn,
    )


def render_prompt(
    processor: Any, request: StoredRequest, video_frames: list[list[Image.Image]], images: list[Image.Image]
) -> Prompt:
    """Without ``prompt``: the model's own chat template, frames of every video then the images,
    then the question. With ``prompt``: its placeholders expanded in the user's order, in the same
    turn format (the template cannot interleave text between images)."""
    if request.prompt is None:
        ordered = [frame for frames in video_frames for frame in frames] + list(images)
        content: list[dict[str, str]] = [{"type": "image"} for _ in ordered]
        content.append({"type": "text", "text": request.question})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return Prompt(text=text, images=ordered, generation=request.generation)

    pieces: list[str] = []
    ordered = []
    videos, stills = iter(video_frames), iter(images)
    rest = request.prompt
    while rest:
        next_video = rest.find(VIDEO_PLACEHOLDER)
        next_image = rest.find(IMAGE_PLACEHOLDER)
        candidates = [p for p in (next_video, next_image) if p >= 0]
        if not candidates:
            pieces.append(rest)
            break
        cut = min(candidates)
        pieces.append(rest[:cut])
        if cut == next_video:
            frames = next(videos)
            ordered.extend(frames)
            pieces.append(IMAGE_TOKEN * len(frames))
            rest = rest[cut + len(VIDEO_PLACEHOLDER) :]
        else:
            ordered.append(next(stills))
            pieces.append(IMAGE_TOKEN)
            rest = rest[cut + len(IMAGE_PLACEHOLDER) :]
    body = "".join(pieces)
    text = f"<|im_start|>user\n{body}\n{request.question}<|im_end|>\n<|im_start|>assistant\n"
    return Prompt(text=text, images=ordered, generation=request.generation)


def _sampling_key(generation: Generation) -> tuple[Any, ...]:
    return (generation.do_sample, generation.temperature, generation.top_p)


def generate(loaded: LoadedModel, prompts: list[Prompt]) -> list[Completion]:
    """Generate for several prompts at once; each keeps its own ``max_new_tokens``.

    Prompts with different sampling settings go through separate ``generate`` calls.
    """
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for position, prompt in enumerate(prompts):
        groups[_sampling_key(prompt.generation)].append(position)
    results: list[Completion | None] = [None] * len(prompts)
    for positions in groups.values():
        for position, completion in zip(positions, _generate_group(loaded, [prompts[p] for p in positions])):
            results[position] = completion
    return [completion for completion in results if completion is not None]


def _generate_group(loaded: LoadedModel, prompts: list[Prompt]) -> list[Completion]:
    import torch

    processor = loaded.processor
    inputs = processor(
        text=[prompt.text for prompt in prompts],
        images=[image for prompt in prompts for image in prompt.images] or None,
        return_tensors="pt",
        padding=True,
    ).to(loaded.model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    generation = prompts[0].generation
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(prompt.generation.max_new_tokens for prompt in prompts),
        "do_sample": generation.do_sample,
        "pad_token_id": loaded.pad_token_id,
    }
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature or 1.0, top_p=generation.top_p or 1.0)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    eos = loaded.eos_token_ids
    completions = []
    for row, prompt in enumerate(prompts):
        new_tokens = output[row, prompt_length:].tolist()[: prompt.generation.max_new_tokens]
        for cut, token in enumerate(new_tokens):
            if token in eos:
                new_tokens = new_tokens[: cut + 1]
                break
        completions.append(
            Completion(
                token_ids=new_tokens,
                text=processor.tokenizer.decode(new_tokens, skip_special_tokens=True),
                prompt_tokens=int(inputs["attention_mask"][row].sum()),
            )
        )
    return completions
