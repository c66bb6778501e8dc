"""The model's image geometry, so frames are stored already resized exactly as its image
processor would resize them and the GPU side only normalises.

CPU workers never reach the model hub: a local model folder's processor config gives the geometry,
and for a hub id the settings do (``VIDEOQA_IMAGE_SIZE``; the GPU worker, which has the processor,
warns when they disagree). Reading the processor config needs transformers, so that happens in
``worker.app.resources.load_geometry``; here only what a processor says is turned into a geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
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
