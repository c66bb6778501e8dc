"""The model's image geometry, so frames are stored already resized exactly as its image
processor would resize them and the GPU side only normalises."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image


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
def load_geometry(model: str) -> FrameGeometry:
    """Read size and resample from the model's image processor config (no weights)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model)
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
