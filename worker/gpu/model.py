"""LLaVA-Interleave behind a small interface: load once, render prompts, generate in batches.

Batched greedy generation uses left padding, the attention mask and the pad token, which gives
every prompt exactly the tokens it would get alone. Each prompt is encoded on its own (token ids
in which user text stays text, see worker.gpu.prompt_ids, and its images' pixel values), so a prompt
that cannot be encoded fails alone, before it joins a batch.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from PIL import Image

from common.schemas import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Generation, StoredRequest
from common.settings import Settings
from worker.gpu.conversation import render_conversation
from worker.gpu.pixels import Normalisation, host_pixels, to_model_input
from worker.gpu.precision import resolve_dtype
from worker.gpu.prefix_cache import pixel_digest
from worker.gpu.prompt_ids import Span, prompt_ids

log = logging.getLogger(__name__)

# What to do about a model that cannot be loaded (also said by ``videoqa up`` before it starts workers).
MODEL_HINT = (
    "set VIDEOQA_MODEL to a local model folder or a hub id, or build a test model with `videoqa tiny-model DIR`"
)

IMAGE_TOKEN = "<image>"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    device: str
    dtype: str
    attn_implementation: str
    revision: str | None = None
    compiled: Any = None  # a worker.gpu.compiled.CompiledDecoding with VIDEOQA_COMPILE=decode

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

    @cached_property
    def image_token_id(self) -> int:
        return int(self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token))

    @cached_property
    def image_token_count(self) -> int:
        """Ids the processor puts in place of one image token. Asked of the processor itself: every
        image is resized to the image processor's one size, so the count does not vary."""
        processor = self.processor
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        inputs = processor(text=[processor.image_token], images=[_blank_image(processor)])
        return list(inputs["input_ids"][0]).count(image_id)

    @cached_property
    def normalisation(self) -> Normalisation | None:
        return Normalisation.of(self.processor.image_processor)


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: Any | None  # a tensor, one row per image in prompt order; None without images
    # Instead of ``pixel_values``: the images as uint8 (images, height, width, 3), normalised on
    # the device when the batch runs (worker.gpu.pixels).
    pixels: Any | None = None
    pixel_digest: str = ""  # of the images pixel_values are made from, which the prefix cache's keys hold


@dataclass
class Prompt:
    text: str
    images: list[Image.Image]
    generation: Generation = field(default_factory=Generation)
    # Where ``text`` holds the user's own text, which is tokenized as literal text.
    user_spans: tuple[Span, ...] = ()
    encoded: EncodedPrompt | None = None


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

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
    # transformers' own check, not "is there a module named flash_attn": flash-attn-4 installs a
    # module of that name too, which flash_attention_2 cannot load.
    from transformers.utils import is_flash_attn_2_available

    if device == "cuda" and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded on this worker; retrying each job would fail the same way."""


def load_model(settings: Settings) -> LoadedModel:
    """Load model and processor from a hub id or a local folder (``VIDEOQA_DTYPE``; by default fp16
    on CUDA, fp32 on CPU: worker.gpu.precision).

    Raises ``ModelLoadError`` with a message for an operator: no such model, weights not cached
    while offline, not enough memory, an attention implementation that is not installed.
    """
    import torch

    try:
        return _load_model(settings)
    except torch.OutOfMemoryError as exc:
        free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
        raise ModelLoadError(
            f"cannot load {settings.model}: out of GPU memory ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
            " after the attempt); is another process using this GPU?"
        ) from exc
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") and isinstance(exc, OSError):
            hint = " (HF_HUB_OFFLINE is set: the weights must already be in the cache under HF_HOME)"
        if isinstance(exc, (OSError, ValueError)):  # not found, or not a hub id either
            hint += f"; {MODEL_HINT}"
        raise ModelLoadError(f"cannot load {settings.model}: {first_line}{hint}") from exc


def _load_model(settings: Settings) -> LoadedModel:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would flood the worker's log
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, settings.attn_implementation)
    attn = resolve_attention(settings.attn_implementation, device)
    if attn == "flash_attention_2" and dtype == torch.float32:
        attn = "sdpa"  # chosen by `auto`: flash-attention runs in half precision only
    processor = LlavaProcessor.from_pretrained(settings.model)
    # Left padding is what keeps batched greedy answers equal to unbatched ones.
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(settings.model, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` through a decorator that loses `self`
    compiled = None
    if settings.compile == "decode":
        from worker.gpu.compiled import CompiledDecoding

        compiled = CompiledDecoding.create()
    log.info("loaded %s on %s (%s, %s, compile %s)", settings.model, device, dtype, attn, settings.compile)
    return LoadedModel(
        model=model,
        processor=processor,
        model_id=settings.model,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        attn_implementation=attn,
        revision=getattr(model.config, "_commit_hash", None),
        compiled=compiled,
    )


def render_prompt(
    processor: Any, request: StoredRequest, video_frames: list[list[Image.Image]], images: list[Image.Image]
) -> Prompt:
    """Without ``prompt``: the model's own chat template, frames of every video then the images,
    then the question. With ``prompt``: its placeholders expanded in the user's order, in the same
    turn format (the template cannot interleave text between images). The prompt records where the
    user's text lies, so that it is tokenized as text. With earlier turns: worker.gpu.conversation."""
    if request.history:
        text, ordered, turn_spans = render_conversation(processor, request, video_frames, images)
        return Prompt(text, ordered, request.generation, user_spans=turn_spans)
    if request.prompt is None:
        ordered = [frame for frames in video_frames for frame in frames] + list(images)
        content: list[dict[str, str]] = [{"type": "image"} for _ in ordered]
        # The template renders a marker where the question goes, so the question's span is known
        # without parsing the template's output.
        marker = f"<{uuid.uuid4().hex}>"
        content.append({"type": "text", "text": marker})
        rendered = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        before, found, after = rendered.partition(marker)
        if not found or marker in after:
            raise ValueError("the chat template does not render the question exactly once")
        span = (len(before), len(before) + len(request.question))
        return Prompt(before + request.question + after, ordered, request.generation, user_spans=(span,))

    pieces: list[str] = ["<|im_start|>user\n"]
    spans: list[Span] = []
    ordered = []
    videos, stills = iter(video_frames), iter(images)

    def user_text(part: str) -> None:
        start = sum(map(len, pieces))
        spans.append((start, start + len(part)))
        pieces.append(part)

    rest = request.prompt
    while rest:
        next_video = rest.find(VIDEO_PLACEHOLDER)
        next_image = rest.find(IMAGE_PLACEHOLDER)
        candidates = [p for p in (next_video, next_image) if p >= 0]
        if not candidates:
            user_text(rest)
            break
        cut = min(candidates)
        user_text(rest[:cut])
        if cut == next_video:
            frames = next(videos)
            ordered.extend(frames)
            pieces.append(IMAGE_TOKEN * len(frames))
            rest = rest[cut + len(VIDEO_PLACEHOLDER) :]
        else:
            ordered.append(next(stills))
            pieces.append(IMAGE_TOKEN)
            rest = rest[cut + len(IMAGE_PLACEHOLDER) :]
    pieces.append("\n")
    user_text(request.question)
    pieces.append("<|im_end|>\n<|im_start|>assistant\n")
    return Prompt("".join(pieces), ordered, request.generation, user_spans=tuple(spans))


def encode_prompt(loaded: LoadedModel, prompt: Prompt) -> EncodedPrompt:
    """``prompt`` with its token ids and pixel values, the per-job part of the processor's work."""
    processor = loaded.processor
    ids = prompt_ids(
        processor.tokenizer,
        prompt.text,
        prompt.user_spans,
        image_token=processor.image_token,
        image_token_count=loaded.image_token_count,
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if ids.count(image_id) != loaded.image_token_count * len(prompt.images):
        raise ValueError(f"the prompt's image tokens do not match its {len(prompt.images)} images")
    if not prompt.images:
        return EncodedPrompt(input_ids=ids, pixel_values=None)
    digest = pixel_digest(prompt.images)
    normalisation = loaded.normalisation
    if normalisation is not None and normalisation.fits(prompt.images):
        # Stored frames are at the model's size: only rescale and normalise remain, on the device.
        pixels = host_pixels(prompt.images, pin=loaded.device.startswith("cuda"))
        return EncodedPrompt(input_ids=ids, pixel_values=None, pixels=pixels, pixel_digest=digest)
    pixel_values = processor.image_processor(prompt.images, return_tensors="pt")["pixel_values"]
    return EncodedPrompt(input_ids=ids, pixel_values=pixel_values, pixel_digest=digest)


def generation_key(generation: Generation) -> tuple[Any, ...]:
    """Prompts that share this key can be generated in one call."""
    return (generation.do_sample, generation.temperature, generation.top_p)


class GenerationWatch(Protocol):
    """A stopping criterion that follows one ``generate`` call row by row (see worker.gpu.batch)."""

    def bind(self, prompt_length: int, prompt_tokens: list[int]) -> None: ...

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any: ...


def completion_from_tokens(
    loaded: LoadedModel, new_tokens: list[int], max_new_tokens: int, prompt_tokens: int
) -> Completion:
    """One row's answer: its new tokens cut at its own ``max_new_tokens`` and after its first eos
    (later positions of a finished row hold padding)."""
    tokens = new_tokens[:max_new_tokens]
    eos = loaded.eos_token_ids
    for cut, token in enumerate(tokens):
        if token in eos:
            tokens = tokens[: cut + 1]
            break
    return Completion(
        token_ids=tokens,
        text=loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
    )


def generate_one_call(
    loaded: LoadedModel, prompts: list[Prompt], *, watch: GenerationWatch | None = None
) -> list[Completion]:
    """One ``model.generate`` call for prompts that share their generation settings (left padding,
    the attention mask and the pad token keep each row's greedy tokens equal to its own)."""
    import torch

    encoded = [prompt.encoded or encode_prompt(loaded, prompt) for prompt in prompts]
    padded = loaded.processor.tokenizer.pad(
        {"input_ids": [item.input_ids for item in encoded]},
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    inputs: dict[str, Any] = {name: padded[name].to(loaded.model.device) for name in ("input_ids", "attention_mask")}
    pixels = [
        device_pixels(loaded, item) for item in encoded if item.pixel_values is not None or item.pixels is not None
    ]
    if pixels:
        # Rows in prompt order: the model fills the image tokens in that order.
        inputs["pixel_values"] = torch.cat(pixels)
    generation = prompts[0].generation
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(prompt.generation.max_new_tokens for prompt in prompts),
        "do_sample": generation.do_sample,
        "pad_token_id": loaded.pad_token_id,
    }
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature or 1.0, top_p=generation.top_p or 1.0)
    prompt_length = inputs["input_ids"].shape[1]
    prompt_tokens = [int(count) for count in inputs["attention_mask"].sum(dim=1).tolist()]
    if watch is not None:
        from transformers import StoppingCriteriaList

        watch.bind(prompt_length, prompt_tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
    real_rows = len(prompts)
    if loaded.compiled is not None:
        real_rows = loaded.compiled.apply(inputs, kwargs, [len(prompt.images) for prompt in prompts])
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **kwargs)
    rows = output[:real_rows, prompt_length:].tolist()
    return [
        completion_from_tokens(loaded, rows[row], prompt.generation.max_new_tokens, prompt_tokens[row])
        for row, prompt in enumerate(prompts)
    ]


def device_pixels(loaded: LoadedModel, encoded: EncodedPrompt) -> Any:
    """The prompt's images as the model's pixel values, on its device and in its dtype: uint8
    frames normalised there, or the processor's values moved; None without images."""
    device, dtype = loaded.model.device, loaded.model.dtype
    if encoded.pixels is not None and loaded.normalisation is not None:
        return to_model_input(encoded.pixels, loaded.normalisation, device, dtype)
    if encoded.pixel_values is None:
        return None
    return encoded.pixel_values.to(device, dtype)


def warm_up(loaded: LoadedModel) -> list[Completion]:
    """One short generation on a blank frame: the first call pays for kernel selection and
    allocator growth, so the first job does not."""
    frame = _blank_image(loaded.processor)
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return generate_one_call(loaded, [Prompt(text=text, images=[frame], generation=Generation(max_new_tokens=2))])


def _blank_image(processor: Any) -> Image.Image:
    size = processor.image_processor.size
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    return Image.new("RGB", (int(width), int(height)))


def memory_info(loaded: LoadedModel) -> tuple[int, int]:
    """Free and total bytes of the memory the model lives in (GPU memory, or RAM on CPU)."""
    if loaded.device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
