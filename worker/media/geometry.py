"""The model's image geometry, so frames are stored already resized exactly as its image
processor would resize them and the GPU side only normalises.

CPU workers never reach the model hub: a local model folder's processor config gives the geometry,
and for a hub id the settings do (``VIDEOQA_IMAGE_SIZE``; the GPU worker, which has the processor,
warns when they disagree).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

# What SigLIP's image processor (the served model's) resizes with.
DEFAULT_RESAMPLE = int(Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class FrameGeometry:
    width: int
    height: int
    resample: int

    def key(self) -> str:
        return f"{self.width}x{self.height}r{self.resample}"

    def resize(self, image: Image.Image) -> Image.Image:
        # The processor's PIL path: RGB, then Image.resize with its resample filter and no
        # reducing gap. Resizing a frame that already has the target size is then a no-op there.
        return image.convert("RGB").resize((self.width, self.height), resample=self.resample)


@lru_cache(maxsize=4)
def load_geometry(model: str, image_size: int = 384) -> FrameGeometry:
    """Size and resample from a local model folder's image processor config (no weights), else
    ``image_size`` square with the served model's filter; never a hub request."""
    if not Path(model).is_dir():
        return FrameGeometry(width=image_size, height=image_size, resample=DEFAULT_RESAMPLE)
    from transformers import AutoImageProcessor

    return processor_geometry(AutoImageProcessor.from_pretrained(model), model)


def processor_geometry(processor: Any, model: str) -> FrameGeometry:
    """The geometry an image processor resizes to."""
    size = processor.size
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    else:
        height, width = getattr(size, "height", None), getattr(size, "width", None)
    if not height or not width:
        raise RuntimeError(f"{model}: only fixed height x width image processors are supported, got {size}")
    resample = int(getattr(processor, "resample", Image.Resampling.BICUBIC))
    return FrameGeometry(width=int(width), height=int(height), resample=resample)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")
