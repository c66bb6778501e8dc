"""Pixel values made on the device: frames are stored at the model's geometry (worker.media.geometry),
so the image processor's CPU work (convert, resize, rescale, normalise, all in float32 numpy) is
reduced to moving uint8 pixels and doing the arithmetic where the model runs.

On the host a prompt's images become one uint8 tensor (images, height, width, 3), pinned when the
model is on CUDA so the copy is asynchronous; on the device ``to_model_input`` turns a batch of
them into what the processor gives (images, 3, height, width), rescaled and normalised with the
processor's own ``rescale_factor``, ``image_mean`` and ``image_std`` in float32, then cast to the
model's dtype, as the processor's output is cast today. An image of another size (or a processor
that does more than rescale and normalise) goes through the processor itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Normalisation:
    """What the image processor does to an image already at its size."""

    width: int
    height: int
    rescale_factor: float | None  # None: no rescale
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, image_processor: Any) -> Normalisation | None:
        """The processor's normalisation, or None when its config asks for more than this module
        does (padding, cropping, a size that varies): such a processor keeps its own path."""
        size = getattr(image_processor, "size", None)
        height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
        if (
            not height
            or not width
            or getattr(image_processor, "do_center_crop", False)
            or getattr(image_processor, "do_pad", False)
        ):
            return None
        rescale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else None
        mean = std = None
        if getattr(image_processor, "do_normalize", True):
            mean = tuple(float(value) for value in _three(image_processor.image_mean))
            std = tuple(float(value) for value in _three(image_processor.image_std))
        return cls(int(width), int(height), rescale, mean, std)

    def fits(self, images: list[Image.Image]) -> bool:
        return all(image.size == (self.width, self.height) for image in images)


def _three(value: Any) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * 3 if len(values) == 1 else values


def host_pixels(images: list[Image.Image], *, pin: bool) -> Any:
    """The images as one uint8 tensor (images, height, width, 3), pinned for an asynchronous copy."""
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    pixels = torch.from_numpy(array)
    return pixels.pin_memory() if pin else pixels


def to_model_input(pixels: Any, normalisation: Normalisation, device: Any, dtype: Any) -> Any:
    """uint8 (images, height, width, 3) on the host -> the processor's pixel values on ``device``."""
    import torch

    on_device = pixels.to(device, non_blocking=True)
    values = on_device.permute(0, 3, 1, 2).to(torch.float32)
    if normalisation.rescale_factor is not None:
        values = values * normalisation.rescale_factor
    if normalisation.mean is not None and normalisation.std is not None:
        mean = torch.tensor(normalisation.mean, dtype=torch.float32, device=values.device).view(1, -1, 1, 1)
        std = torch.tensor(normalisation.std, dtype=torch.float32, device=values.device).view(1, -1, 1, 1)
        values = (values - mean) / std
    return values.contiguous().to(dtype)
