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
from collections.abc import Sequence
from fractions import Fraction
from os import PathLike
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["INDEX_BITS", "read_frame_index", "remux", "write_cat_video", "write_sample_videos"]

# Enough for ~18 minutes at 60 fps; each block stays >= 4 px wide down to 64 px.
INDEX_BITS = 16

_AUDIO_RATE = 16000
_MOV_FORMATS = ("mp4", "mov", "m4v")
_MUXERS = {"mkv": "matroska", "m4v": "mp4"}

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


def _encoder_options(codec: str, gop: int | None, bframes: int | None, *, open_gop: bool = False,
                     preset: str | None = None, threads: int = 1) -> dict[str, str]:
    # A fixed thread count keeps the bitstream identical across machines with
    # different core counts; these clips are tiny so parallelism buys little.
    opts = {"threads": str(threads)}
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
        if bframes:
            # Exactly ``bframes`` B-frames between references: left to itself x264
            # drops them on some content (all of it at 1080p here).
            params.append("b-adapt=0")
        if open_gop:
            # Keyframes after the first are recovery-point I-frames whose leading
            # B-frames reference the previous GOP.
            params.append("open-gop=1")
        opts.update({"preset": preset or "veryfast", "x264-params": ":".join(params)})
    elif codec == "libx265":
        params = ["log-level=error"]
        if gop is not None:
            params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0", f"open-gop={int(open_gop)}"]
        if bframes is not None:
            params.append(f"bframes={bframes}")
        opts.update({"preset": preset or "ultrafast", "x265-params": ":".join(params)})
    elif codec in ("mpeg2video", "mpeg4") and gop is not None and not open_gop:
        # FFmpeg's MPEG encoders make open GOPs unless told: the B-frames shown just before a
        # keyframe are coded after it and refer to the frame before it too. (Their closed GOPs
        # require scene-cut detection off by its own threshold.)
        opts.update({"flags": "+cgop", "sc_threshold": "1000000000"})
    elif codec == "libvpx-vp9":
        # Not "realtime": that deadline adapts speed to wall-clock time, so the
        # output would depend on machine load.
        opts.update({"deadline": "good", "cpu-used": "5", "lag-in-frames": "0"})
        if gop is not None:
            opts["keyint_min"] = str(gop)  # maps to kf_min_dist
    elif codec == "libsvtav1":
        opts.update({"preset": preset or "12"})
        if gop is not None:
            opts["svtav1-params"] = f"keyint={gop}"
    return opts


class _PipeSink:
    """A write-only stream: muxers cannot seek back, as when writing to a pipe or socket."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "wb")

    def write(self, data: bytes) -> int:
        return self._handle.write(data)

    def close(self) -> None:
        self._handle.close()


def _add_audio(container: av.container.OutputContainer, codec: str) -> av.AudioStream:
    stream = container.add_stream(codec, rate=_AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _audio_frame(start: int, count: int) -> av.AudioFrame:
    # A quiet 440 Hz tone; a real signal, so encoders emit real packets.
    t = (np.arange(start, start + count) / _AUDIO_RATE).astype(np.float32)
    samples = (0.1 * np.sin(2 * np.pi * 440 * t)).reshape(1, -1).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
    frame.sample_rate = _AUDIO_RATE
    frame.pts = start
    frame.time_base = Fraction(1, _AUDIO_RATE)
    return frame


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
    frame_times: Sequence[float] | None = None,
    rotation: int = 0,
    open_gop: bool = False,
    audio: bool = False,
    fragmented: bool = False,
    to_pipe: bool = False,
    preset: str | None = None,
    threads: int = 1,
) -> Path:
    """Write a cartoon-cat clip and return its path.

    Frame ``i`` has pts ``i`` in a ``1/fps`` time base.  ``gop`` fixes the
    keyframe interval exactly; ``bframes`` sets the maximum consecutive
    B-frames (``0`` disables them; VP9 has none).  ``None`` leaves the
    encoder's default, which for x264/x265 includes B-frames.

    Real-world shapes: ``frame_times`` (seconds, increasing) makes a variable
    frame rate clip in a millisecond time base; ``rotation`` stores each
    upright ``width`` x ``height`` picture turned by ``-rotation`` degrees with a
    display matrix that turns it back (``-90`` is a phone held upright);
    ``open_gop`` lets leading B-frames reference the previous GOP; ``audio`` adds
    a tone track; ``fragmented`` writes fragmented MP4; ``to_pipe`` writes
    through a stream that cannot seek, so the container has no duration, frame
    count or index.  ``preset`` and ``threads`` trade determinism for speed.
    """
    if variant not in (0, 1):
        raise ValueError(f"variant must be 0 or 1, got {variant}")
    if width % 2 or height % 2 or width < 64 or height < 64:
        raise ValueError("width and height must be even and >= 64 for yuv420p")
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90, got {rotation}")
    if frame_times is not None:
        n_frames = len(frame_times)
        time_base = Fraction(1, 1000)
        stamps = [round(t * 1000) for t in frame_times]
        if n_frames and (stamps[0] < 0 or any(b <= a for a, b in zip(stamps, stamps[1:]))):
            raise ValueError("frame_times must be increasing, non-negative and at least 1 ms apart")
    else:
        n_frames = round(seconds * fps)
        time_base = Fraction(1, fps)
        stamps = list(range(n_frames))
    if n_frames < 1:
        raise ValueError("clip must contain at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    turns = (-rotation // 90) % 4
    stored_width, stored_height = (height, width) if turns % 2 else (width, height)
    format_name = (container_format or path.suffix.lstrip(".")).lower()

    # bitexact drops the random Matroska segment UID and the muxer version tag.
    container_options = {"fflags": "+bitexact"}
    if format_name in _MOV_FORMATS:
        # The mov muxer otherwise rescales to its own timescale (e.g. 1/15360);
        # pinning it keeps stored pts equal to frame indices (or milliseconds).
        # (WebM/Matroska always stores milliseconds; pts there is round(i*1000/fps).)
        container_options["video_track_timescale"] = str(time_base.denominator)
        if fragmented:
            container_options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
    sink = _PipeSink(path) if to_pipe else None
    try:
        # A stream has no file name to guess the format from.
        muxer = container_format or (_MUXERS.get(format_name, format_name) if sink is not None else None)
        with av.open(sink if sink is not None else str(path), mode="w", format=muxer,
                     container_options=container_options) as container:
            stream = container.add_stream(codec, rate=fps, options=_encoder_options(
                codec, gop, bframes, open_gop=open_gop, preset=preset, threads=threads))
            stream.width, stream.height = stored_width, stored_height
            stream.pix_fmt = "yuv420p"
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
            stream.codec_context.framerate = Fraction(fps, 1)
            if rotation:
                stream.set_display_rotation(rotation)
            sound = _add_audio(container, "aac" if format_name in _MOV_FORMATS else "libopus") if audio else None
            sent = 0
            for index, stamp in enumerate(stamps):
                rgb = _render_frame(index, n_frames, fps, width, height, variant)
                if turns:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
                frame.pts = stamp
                frame.time_base = time_base
                container.mux(stream.encode(frame))
                if sound is not None:
                    # Keep the tone as long as the pictures, interleaved with them.
                    until = round((stamp * time_base + Fraction(1, fps)) * _AUDIO_RATE)
                    while sent + 960 <= until:
                        container.mux(sound.encode(_audio_frame(sent, 960)))
                        sent += 960
            container.mux(stream.encode(None))  # drain delayed (e.g. B-) frames
            if sound is not None:
                container.mux(sound.encode(None))
    finally:
        if sink is not None:
            sink.close()
    return path


def remux(
    source: str | PathLike[str],
    path: str | PathLike[str],
    *,
    container_format: str | None = None,
    fragmented: bool = False,
    to_pipe: bool = False,
) -> Path:
    """Copy the video stream of ``source`` into another container without re-encoding, as
    ``ffmpeg -c copy`` does, and return ``path``. The muxer is guessed from ``path`` unless
    ``container_format`` names it; it converts the bitstream where it needs to (H.264 and HEVC to
    Annex B for MPEG-TS) and picks its own time base. ``fragmented`` and ``to_pipe`` are as for
    :func:`write_cat_video`. FFmpeg's refusal of a codec the container cannot hold is raised as is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    format_name = (container_format or path.suffix.lstrip(".")).lower()
    container_options = {"fflags": "+bitexact"}
    if fragmented:
        container_options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
    sink = _PipeSink(path) if to_pipe else None
    try:
        muxer = container_format or (_MUXERS.get(format_name, format_name) if sink is not None else None)
        with av.open(str(source)) as reader, av.open(
            sink if sink is not None else str(path), mode="w", format=muxer, container_options=container_options
        ) as writer:
            if not reader.streams.video:
                raise ValueError(f"{source} holds no video stream FFmpeg reads")
            video = reader.streams.video[0]
            # Parameters only: no encoder is looked up (there is none named after AV1's decoder).
            stream = writer.add_stream_from_template(video, opaque=True)
            for packet in reader.demux(video):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                packet.stream = stream
                writer.mux(packet)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        if sink is not None:
            sink.close()
    return path


def write_sample_videos(directory: str | PathLike[str]) -> list[Path]:
    """Write ``cats_1.mp4`` (walking cat) and ``cats_2.mp4`` (jumping cat)."""
    directory = Path(directory)
    return [write_cat_video(directory / "cats_1.mp4", variant=0),
            write_cat_video(directory / "cats_2.mp4", variant=1)]
