"""Frame sampling with PyAV: exact indices and timestamps from the stream, seek-based decoding.

The frame count and every timestamp come from the demuxed packets (pts and time base), never
from the container header. Only the frames the strategy asks for are converted to RGB; the
decoder seeks to the keyframe before a target unless the target can be reached by decoding on.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

from common.errors import InvalidMedia
from common.schemas import Sampling

# Only plain files reach the demuxer: protocols that could follow a reference elsewhere are refused.
_OPEN_OPTIONS = {"protocol_whitelist": "file"}


@dataclass(frozen=True)
class StreamIndex:
    """Presentation-ordered pts of every frame of the first video stream, and its keyframes."""

    pts: list[int]
    keyframe_pts: list[int]
    time_base: Fraction

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    def seconds(self, position: int) -> float:
        return float((self.pts[position] - self.pts[0]) * self.time_base)


@dataclass(frozen=True)
class SampledFrame:
    index: int
    time: float
    image: Image.Image


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r", options=_OPEN_OPTIONS)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidMedia(f"not a readable media file: {exc}") from None
    if not container.streams.video:
        container.close()
        raise InvalidMedia("the file has no video stream")
    return container


def index_stream(path: Path) -> StreamIndex:
    """Demux (without decoding) to learn every frame's pts and where the keyframes are."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        pts: list[int] = []
        keyframes: list[int] = []
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or stamp is None:
                    continue
                pts.append(stamp)
                if packet.is_keyframe:
                    keyframes.append(stamp)
        except av.FFmpegError as exc:
            if not pts:
                raise InvalidMedia(f"the video stream cannot be read: {exc}") from None
        if not pts:
            raise InvalidMedia("the video stream has no frames")
        if stream.time_base is None:
            raise InvalidMedia("the video stream has no time base")
        return StreamIndex(sorted(pts), sorted(keyframes), Fraction(stream.time_base))
    finally:
        container.close()


def choose_positions(index: StreamIndex, sampling: Sampling) -> list[int]:
    """Which frames (positions in presentation order) the strategy picks.

    Default: the reference notebook's ``0, k, ..., (N-1)k`` with ``k = T // N`` (every frame when
    ``T < N``), over the ``start``/``end`` window when one is given. With ``fps``: the first frame
    at or after each multiple of ``1/fps`` inside the window.
    """
    times = [index.seconds(i) for i in range(index.frame_count)]
    first = bisect.bisect_left(times, sampling.start) if sampling.start is not None else 0
    last = bisect.bisect_left(times, sampling.end) if sampling.end is not None else len(times)
    window = list(range(first, last))
    if not window:
        raise InvalidMedia(
            f"the window {sampling.start}..{sampling.end} s holds no frames "
            f"(the video lasts {times[-1]:.3f} s)"
        )
    if sampling.fps is not None:
        step = 1.0 / sampling.fps
        origin = times[window[0]]
        picked: list[int] = []
        target = origin
        while len(picked) < sampling.num_frames:
            position = bisect.bisect_left(times, target - 1e-9, lo=window[0], hi=window[-1] + 1)
            if position > window[-1]:
                break
            if not picked or position != picked[-1]:
                picked.append(position)
            target += step
        return picked
    total, wanted = len(window), sampling.num_frames
    if total <= wanted:
        return window
    stride = total // wanted
    return [window[0] + i * stride for i in range(wanted)]


def decode_positions(path: Path, index: StreamIndex, positions: list[int]) -> list[SampledFrame]:
    """Decode exactly the frames at ``positions`` (ascending), seeking where that is cheaper."""
    targets = [index.pts[p] for p in positions]
    found: dict[int, Image.Image] = {}
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = None
        last_pts: int | None = None
        for target in targets:
            if frames is None or last_pts is None or last_pts >= target or _keyframe_between(
                index.keyframe_pts, last_pts, target
            ):
                # Lands on the keyframe at or before the target; the decoder is flushed by seek().
                container.seek(target, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None:
                    continue
                last_pts = frame.pts
                if frame.pts >= target:
                    found[target] = frame.to_image()
                    break
            else:
                raise InvalidMedia(f"the video ended before its frame at pts {target}")
    except av.FFmpegError as exc:
        raise InvalidMedia(f"the video cannot be decoded: {exc}") from None
    finally:
        container.close()
    return [
        SampledFrame(index=p, time=round(index.seconds(p), 6), image=found[index.pts[p]]) for p in positions
    ]


def _keyframe_between(keyframes: list[int], after: int, upto: int) -> bool:
    """Whether a keyframe lies in (after, upto]: then seeking skips at least one whole GOP."""
    position = bisect.bisect_right(keyframes, after)
    return position < len(keyframes) and keyframes[position] <= upto


def sample_frames(path: Path, sampling: Sampling) -> list[SampledFrame]:
    index = index_stream(path)
    return decode_positions(path, index, choose_positions(index, sampling))
