"""Jobs for the tiny model in this process, and what each gets generated alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from common.schemas import Generation
from worker.gpu.batch import BatchItem
from worker.gpu.model import LoadedModel, Prompt, encode_prompt


def frames(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(count)]


def job(
    loaded: LoadedModel,
    key: str,
    images: list[Image.Image],
    question: str,
    max_new_tokens: int,
    generation: Generation | None = None,
) -> BatchItem:
    """A prepared job as the GPU stage hands it over: chat template, frames first, encoded."""
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    prompt = Prompt(text=text, images=images, generation=generation or Generation(max_new_tokens=max_new_tokens))
    return BatchItem(key, replace(prompt, encoded=encode_prompt(loaded, prompt)))


def solo(loaded: LoadedModel, item: BatchItem) -> list[int]:
    """A direct greedy ``model.generate`` of the job alone, through the processor."""
    prompt = item.prompt
    inputs = loaded.processor(text=[prompt.text], images=prompt.images, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=prompt.generation.max_new_tokens)
    return output[0, inputs["input_ids"].shape[1] :].tolist()
