"""Probing a media file before decoding it: what it is, and whether it is within the limits.

The container is opened with the demuxers of self-contained video files only
(``worker.media.sampling.VIDEO_DEMUXERS``): demuxers that follow references to other files or URLs (HLS and
DASH playlists, concat lists, image2 patterns) are refused before they read anything, and so are
still images, which are not videos. Header values (duration, frame count) are
checked when a file declares them; ``check_index`` checks the same limits against the stream
itself once its packets have been read, since headers can be missing or wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

from common.errors import InvalidMedia, MediaTooLarge
from common.settings import Settings
from worker.media.sampling import StreamIndex, open_input, video_stream


@dataclass(frozen=True)
class MediaLimits:
    """The configured limits on one video, in a form child processes can receive."""

    max_seconds: float
    max_pixels: int
    max_frames: int
    max_streams: int
    max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaLimits:
        return cls(
            max_seconds=settings.max_video_seconds,
            max_pixels=settings.max_video_pixels,
            max_frames=settings.max_video_frames,
            max_streams=settings.max_streams,
            max_bytes=settings.max_download_bytes,
        )


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    streams: int
    width: int
    height: int
    codec: str
    bytes: int
    # From the header, when it says: a hint only, never used to pick frames.
    declared_seconds: float | None
    declared_frames: int | None


def probe(path: Path, limits: MediaLimits) -> MediaInfo:
    """Open ``path`` without decoding it; refuse what is not a video or is over the limits."""
    container, info = open_checked(path, limits)
    container.close()
    return info


def open_checked(path: Path, limits: MediaLimits) -> tuple[av.container.InputContainer, MediaInfo]:
    """``probe``, keeping the container open for the caller (who closes it)."""
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise MediaTooLarge(f"the file is {size} bytes; the limit is {limits.max_bytes} (VIDEOQA_MAX_DOWNLOAD_BYTES)")
    try:
        container = open_input(path)
    except InvalidMedia:
        if _is_image(path):
            raise InvalidMedia("the file is an image, not a video") from None
        raise
    try:
        return container, _describe(container, size, limits)
    except BaseException:
        container.close()
        raise


def _describe(container: av.container.InputContainer, size: int, limits: MediaLimits) -> MediaInfo:
    streams = len(container.streams)
    if streams > limits.max_streams:
        raise MediaTooLarge(f"the file has {streams} streams; the limit is {limits.max_streams} (VIDEOQA_MAX_STREAMS)")
    stream = video_stream(container)
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise InvalidMedia("the video stream has no picture size")
    check_pixels(width, height, limits)
    declared_seconds = _declared_seconds(container, stream)
    declared_frames = stream.frames or None
    if declared_seconds is not None:
        check_seconds(declared_seconds, limits)
    if declared_frames is not None:
        check_frames(declared_frames, limits)
    return MediaInfo(
        format_name=container.format.name,
        streams=streams,
        width=width,
        height=height,
        codec=stream.codec_context.name,
        bytes=size,
        declared_seconds=declared_seconds,
        declared_frames=declared_frames,
    )


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow raises, it is not an image it can read
        return False


def _declared_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * Fraction(stream.time_base))
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def check_index(index: StreamIndex, limits: MediaLimits) -> None:
    """The limits again, against what the stream really holds."""
    check_frames(index.frame_count, limits)
    check_seconds(index.duration, limits)


def check_pixels(width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_pixels:
        raise MediaTooLarge(
            f"the video is {width}x{height} ({width * height} pixels); the limit is {limits.max_pixels} "
            "pixels (VIDEOQA_MAX_VIDEO_PIXELS)"
        )


def check_seconds(seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_seconds:
        raise MediaTooLarge(
            f"the video lasts {seconds:.1f} s; the limit is {limits.max_seconds:g} s (VIDEOQA_MAX_VIDEO_SECONDS)"
        )


def check_frames(frames: int, limits: MediaLimits) -> None:
    if frames > limits.max_frames:
        raise MediaTooLarge(
            f"the video has {frames} frames; the limit is {limits.max_frames} (VIDEOQA_MAX_VIDEO_FRAMES)"
        )
