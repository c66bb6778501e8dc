"""Synthetic sample videos for the demo and the tests.

Everything is drawn and encoded locally with Pillow and PyAV, so the demo and
the test-suite never need to download media.  Each video shows a cartoon cat
(variant 0 walks left to right, variant 1 jumps in place) and carries the
frame index as a row of black/white blocks along the bottom edge, so that any
two consecutive frames differ and tests can recover the index from pixels with
:func:`read_frame_index`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from os import PathLike
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["INDEX_BITS", "read_frame_index", "write_cat_video", "write_sample_videos"]

# Enough for ~18 minutes at 60 fps; each block stays >= 4 px wide down to 64 px.
INDEX_BITS = 16

# (sky, ground, body, ear-inside, eye) per variant; variant 1 is deliberately
# a different palette so the two sample files are easy to tell apart.
_PALETTES = (
    ((135, 206, 235), (60, 150, 60), (240, 140, 40), (255, 190, 200), (20, 120, 20)),
    ((70, 40, 110), (150, 110, 70), (90, 90, 100), (230, 150, 170), (240, 220, 40)),
)


def _index_strip_height(height: int) -> int:
    # Tall enough to survive 4:2:0 subsampling and macroblock-level quantisation.
    return max(8, height // 20)


def _draw_cat(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float,
              t: float, palette: tuple) -> None:
    """Draw a cat whose body is centred at (cx, cy) with body radius ``r``."""
    _, _, body, ear_in, eye = palette
    # The tail wags so even the "jumping" cat has motion at the top of its arc.
    wag = math.sin(t * 2 * math.pi * 1.5) * 0.6
    tail_end = (cx - 2.0 * r, cy - 1.2 * r + wag * r)
    draw.line([(cx - 0.8 * r, cy), (cx - 1.5 * r, cy - 0.4 * r), tail_end],
              fill=body, width=max(2, int(r / 4)), joint="curve")
    draw.ellipse([cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r], fill=body)
    hx, hy, hr = cx + 0.9 * r, cy - 0.9 * r, 0.6 * r
    for side in (-1, 1):
        ex = hx + side * 0.45 * hr
        draw.polygon([(ex - 0.4 * hr, hy - 0.5 * hr), (ex + 0.4 * hr, hy - 0.5 * hr),
                      (ex + side * 0.2 * hr, hy - 1.5 * hr)], fill=body)
        draw.polygon([(ex - 0.2 * hr, hy - 0.6 * hr), (ex + 0.2 * hr, hy - 0.6 * hr),
                      (ex + side * 0.15 * hr, hy - 1.2 * hr)], fill=ear_in)
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body)
    er = max(1.0, 0.15 * hr)
    for ex in (hx - 0.35 * hr, hx + 0.35 * hr):
        draw.ellipse([ex - er, hy - 0.2 * hr - er, ex + er, hy - 0.2 * hr + er], fill=eye)
    draw.ellipse([hx - er / 1.5, hy + 0.2 * hr - er / 1.5,
                  hx + er / 1.5, hy + 0.2 * hr + er / 1.5], fill=(230, 90, 120))


def _render_frame(index: int, n_frames: int, fps: int, width: int, height: int,
                  variant: int) -> np.ndarray:
    palette = _PALETTES[variant]
    strip = _index_strip_height(height)
    ground_y = int((height - strip) * 0.75)
    img = Image.new("RGB", (width, height), palette[0])
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, ground_y, width, height], fill=palette[1])

    t = index / fps
    r = min(width, height) * 0.12
    if variant == 0:
        # Cross the frame once over the whole clip, whatever its length; the
        # margins keep the tail (2r left) and head (1.5r right) in view.
        progress = index / max(1, n_frames - 1)
        cx = 2.2 * r + progress * (width - 3.9 * r)
        cy = ground_y - 0.5 * r
    else:
        # Two hops per second; |sin| gives a bounce that lands on the ground.
        cx = width / 2
        cy = ground_y - 0.5 * r - abs(math.sin(t * 2 * math.pi)) * (ground_y - 2.8 * r)
    _draw_cat(draw, cx, cy, r, t, palette)

    # Binary frame index: bit 0 flips every frame, so neighbours always differ.
    cell = width / INDEX_BITS
    for bit in range(INDEX_BITS):
        on = (index >> bit) & 1
        draw.rectangle([round(bit * cell), height - strip, round((bit + 1) * cell) - 1, height - 1],
                       fill=(255, 255, 255) if on else (0, 0, 0))
    return np.asarray(img)


def read_frame_index(rgb: np.ndarray) -> int:
    """Recover the frame index drawn by :func:`write_cat_video` from a decoded RGB frame."""
    height, width = rgb.shape[:2]
    y = height - _index_strip_height(height) // 2
    luma = rgb[y].astype(np.float32).mean(axis=-1)
    cell = width / INDEX_BITS
    return sum(1 << bit for bit in range(INDEX_BITS)
               if luma[int((bit + 0.5) * cell)] > 127)


def _encoder_options(codec: str, gop: int | None, bframes: int | None) -> dict[str, str]:
    # A fixed thread count keeps the bitstream identical across machines with
    # different core counts; these clips are tiny so parallelism buys little.
    opts = {"threads": "1"}
    if gop is not None:
        opts["g"] = str(gop)
        # Without these, scene-cut detection and a shorter minimum interval
        # can insert extra keyframes, breaking the "every `gop` frames" promise.
        opts["keyint_min"] = str(gop)
        opts["sc_threshold"] = "0"
    if bframes is not None:
        opts["bf"] = str(bframes)
    if codec == "libx264":
        # MB-tree + B-frames made x264's output differ run to run (~5% of
        # encodes, apparently an uninitialised read in its asm); it only saves bits.
        params = ["mbtree=0"] + (["scenecut=0"] if gop is not None else [])
        opts.update({"preset": "veryfast", "x264-params": ":".join(params)})
    elif codec == "libx265":
        params = ["log-level=error"]
        if gop is not None:
            params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0", "open-gop=0"]
        if bframes is not None:
            params.append(f"bframes={bframes}")
        opts.update({"preset": "ultrafast", "x265-params": ":".join(params)})
    elif codec == "libvpx-vp9":
        # Not "realtime": that deadline adapts speed to wall-clock time, so the
        # output would depend on machine load.
        opts.update({"deadline": "good", "cpu-used": "5", "lag-in-frames": "0"})
        if gop is not None:
            opts["keyint_min"] = str(gop)  # maps to kf_min_dist
    return opts


def write_cat_video(
    path: str | PathLike[str],
    *,
    seconds: float = 4.0,
    fps: int = 30,
    width: int = 320,
    height: int = 240,
    variant: int = 0,
    codec: str = "libx264",
    gop: int | None = None,
    bframes: int | None = None,
    container_format: str | None = None,
) -> Path:
    """Write a constant-frame-rate cartoon-cat clip and return its path.

    Frame ``i`` has pts ``i`` in a ``1/fps`` time base.  ``gop`` fixes the
    keyframe interval exactly; ``bframes`` sets the maximum consecutive
    B-frames (``0`` disables them; VP9 has none).  ``None`` leaves the
    encoder's default, which for x264/x265 includes B-frames.
    """
    if variant not in (0, 1):
        raise ValueError(f"variant must be 0 or 1, got {variant}")
    if width % 2 or height % 2 or width < 64 or height < 64:
        raise ValueError("width and height must be even and >= 64 for yuv420p")
    n_frames = round(seconds * fps)
    if n_frames < 1:
        raise ValueError("clip must contain at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = Fraction(1, fps)

    # bitexact drops the random Matroska segment UID and the muxer version tag.
    container_options = {"fflags": "+bitexact"}
    if (container_format or path.suffix.lstrip(".")).lower() in ("mp4", "mov", "m4v"):
        # The mov muxer otherwise rescales to its own timescale (e.g. 1/15360);
        # pinning it to fps keeps stored pts equal to frame indices.
        # (WebM/Matroska always stores milliseconds; pts there is round(i*1000/fps).)
        container_options["video_track_timescale"] = str(fps)
    with av.open(str(path), mode="w", format=container_format,
                 container_options=container_options) as container:
        stream = container.add_stream(codec, rate=fps,
                                      options=_encoder_options(codec, gop, bframes))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.codec_context.framerate = Fraction(fps, 1)
        for index in range(n_frames):
            rgb = _render_frame(index, n_frames, fps, width, height, variant)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # drain delayed (e.g. B-) frames
    return path


def write_sample_videos(directory: str | PathLike[str]) -> list[Path]:
    """Write ``cats_1.mp4`` (walking cat) and ``cats_2.mp4`` (jumping cat)."""
    directory = Path(directory)
    return [write_cat_video(directory / "cats_1.mp4", variant=0),
            write_cat_video(directory / "cats_2.mp4", variant=1)]
