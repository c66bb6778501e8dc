"""Still images (a job's ``images``) decoded in a sandboxed child, as videos are: the picture size
is read from the header and checked against ``VIDEOQA_MAX_IMAGE_PIXELS`` before any pixel is
decoded, and the decoder's memory, time and reach are those of ``worker.sandbox.runner``'s children.
Only the resized picture travels back, at the model's geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import InvalidMedia, MediaTooLarge
from common.settings import Settings
from worker.media.decode import MEDIA_SANDBOX
from worker.media.errors import plain_reason
from worker.media.geometry import FrameGeometry
from worker.sandbox.runner import Answer, run_isolated


def decode_image(path: Path, geometry: FrameGeometry, settings: Settings) -> Image.Image:
    """The image at ``path``, in RGB, resized to ``geometry`` in a child; ``MediaTooLarge`` when
    it has more pixels than the limit, ``InvalidMedia`` when it is not an image Pillow reads."""
    ((_, (array,)),) = run_isolated(
        [(_decode, (path, geometry, settings.max_image_pixels))],
        settings.decode_memory_mb * 1024 * 1024,
        settings.decode_timeout_s,
        setup=MEDIA_SANDBOX,
    )
    return Image.fromarray(array)


def _decode(path: Path, geometry: FrameGeometry, max_pixels: int) -> Answer:
    """Runs in the child."""
    # The check below comes first and names the setting; Pillow's own bomb check (at twice its
    # default of 89 M pixels) would only say the file is unreadable.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise MediaTooLarge(
                    f"the image is {width}x{height} ({width * height} pixels); the limit is {max_pixels} "
                    "pixels (VIDEOQA_MAX_IMAGE_PIXELS)"
                )
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidMedia(f"not a readable image: {plain_reason(exc)}") from None
    return None, [np.asarray(geometry.resize(rgb))]
