"""Frame sampling with PyAV: exact indices and timestamps from the stream, decoding only what is needed.

The frame count and every timestamp come from the demuxed packets (pts and time base), never
from the container header. Decoding seeks to the keyframe before a target, or keeps decoding when
the next target comes before the next keyframe; non-reference frames that are not targets are
skipped by the decoder, and only the frames kept are converted to RGB. These are plain functions
that run in whatever process calls them; ``worker.media.decode`` runs them in sandboxed children.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import errno
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from common.errors import InvalidMedia, InvalidRequest
from common.schemas import Sampling
from worker.media.errors import plain_reason
from worker.media.mp4_index import has_sample_tables, read_timestamps
from worker.media.seeking import packets_from

# Demuxers of self-contained video files, by FFmpeg name. Those that follow references to other
# files or URLs (hls, dash, concat, image2 patterns) and image readers are not among them.
VIDEO_DEMUXERS = ("mov", "matroska", "avi", "flv", "mpegts", "mpeg", "ogg", "asf", "ivf", "nut", "mxf")
# Only plain local files reach the demuxer, and only through those demuxers: FFmpeg refuses any
# other format before it reads past the probe.
OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(VIDEO_DEMUXERS)}
# Separate decoders per thread only when the largest share holds at most this part of the work;
# past it, one decoder with frame threads on the largest share does better.
_EVEN_SHARE = 0.7
# Decoders whose skip_frame is read per packet, so non-reference frames can be skipped between
# targets and the targets themselves still decoded. (libdav1d, for one, reads it once at open.)
_SKIPS_NONREF_PER_PACKET = {"h264", "hevc"}
# Codecs whose frames FFmpeg cannot put in presentation order from an AVI file's timestamps when
# they have B-frames (MPEG-4 Part 2 and MPEG-2 it can).
_AVI_UNORDERED = {"h264", "hevc"}
_ROTATIONS = {90: 1, 180: 2, -180: 2, -90: 3, 270: 3}


@dataclass(frozen=True)
class StreamIndex:
    """Presentation-ordered pts of every frame of the video stream, and its keyframes."""

    pts: list[int]
    keyframe_pts: list[int]
    time_base: Fraction
    stream_index: int = 0

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        return self.seconds(len(self.pts) - 1)

    def seconds(self, position: int) -> float:
        return float((self.pts[position] - self.pts[0]) * self.time_base)

    def position_of(self, pts: int) -> int:
        """The presentation position of the frame at ``pts`` (or the first one after it)."""
        return min(bisect.bisect_left(self.pts, pts), len(self.pts) - 1)


@dataclass(frozen=True)
class FrameRef:
    index: int
    time: float


@dataclass(frozen=True)
class SampledFrame:
    index: int
    time: float
    array: np.ndarray = field(repr=False)
    # Fast mode only: seconds between this frame and the target it stands for.
    offset: float | None = None
    # The frame chosen, when it cannot be decoded and this one (the first decodable after it)
    # stands in for it.
    stands_in_for: FrameRef | None = None

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.array)


@dataclass(frozen=True)
class Decoded:
    pts: int
    array: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Segment:
    """Targets reached by one seek: decoding starts at the keyframe ``start`` (a pts)."""

    start: int
    targets: tuple[int, ...]


def open_input(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r", options=dict(OPEN_OPTIONS))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidMedia(f"not a readable media file: {plain_reason(exc)}") from None


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first real video stream; cover art attached to audio files does not count."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise InvalidMedia("the file has no video stream")


def index_stream(path: Path) -> StreamIndex:
    """Every frame's pts and where the keyframes are, without decoding: from an MP4's sample
    tables where FFmpeg agrees with them (``worker.media.mp4_index``), else by demuxing every packet."""
    with open_input(path) as container:
        return index_container(container)


def index_container(container: av.container.InputContainer) -> StreamIndex:
    stream = video_stream(container)
    if stream.time_base is None:
        raise InvalidMedia("the video stream has no time base")
    time_base = Fraction(stream.time_base)
    context = stream.codec_context
    if container.format.name == "avi" and context.name in _AVI_UNORDERED and context.has_b_frames:
        # AVI stores frames in decode order with one timestamp each; FFmpeg has no way to tell the
        # order they are shown in from it, and every choice of frame would be a guess.
        raise InvalidMedia(
            f"the video is {context.name} with B-frames in an AVI file, which carries no presentation "
            "timestamps: its frames cannot be placed in time (an MP4 or Matroska copy of it can)"
        )
    found = read_timestamps(container, stream)
    if found is not None:
        return _index(found.pts, found.keyframe_pts, time_base, stream.index)
    if has_sample_tables(container):
        # The sample tables were not trusted, and checking them may have read packets.
        with open_input(Path(container.name)) as fresh:
            return _demuxed_index(fresh, video_stream(fresh), time_base)
    return _demuxed_index(container, stream, time_base)


def _demuxed_index(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, time_base: Fraction
) -> StreamIndex:
    pts: list[int] = []
    keyframes: list[int] = []
    unstamped = 0
    try:
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            # Frames an edit list cuts are decoded (later frames may refer to them) but never shown.
            if packet.size == 0 or packet.is_discard:
                continue
            if stamp is None:
                unstamped += 1
                continue
            pts.append(stamp)
            if packet.is_keyframe:
                keyframes.append(stamp)
    except av.FFmpegError as exc:
        # A damaged tail still leaves the frames before it usable, as a player would show them.
        if not pts:
            raise InvalidMedia(f"the video stream cannot be read: {plain_reason(exc)}") from None
    if unstamped > len(pts):
        # Frames are chosen and found by their timestamps; a stray packet without one is left out.
        raise InvalidMedia(
            f"{unstamped} of the video's {unstamped + len(pts)} frames carry no timestamp, so they cannot be "
            "placed in time (an MPEG program stream that packs several frames in one packet does this)"
        )
    if not pts:
        raise InvalidMedia("the video stream has no frames")
    return _index(sorted(pts), sorted(keyframes), time_base, stream.index)


def _index(pts: list[int], keyframes: list[int], time_base: Fraction, stream_index: int) -> StreamIndex:
    if not keyframes or keyframes[0] > pts[0]:
        # Decoding has to start somewhere: the first packet is where a player starts too.
        keyframes = [pts[0], *keyframes]
    return StreamIndex(pts, keyframes, time_base, stream_index)


def choose_positions(index: StreamIndex, sampling: Sampling) -> list[int]:
    """Which frames (positions in presentation order) the strategy picks.

    Default: the reference notebook's ``0, k, ..., (N-1)k`` with ``k = T // N`` (every frame when
    ``T < N``), over the ``start``/``end`` window when one is given. With ``fps``: the first frame
    at or after each multiple of ``1/fps`` inside the window.
    """
    frames = range(index.frame_count)

    def first_at(seconds: float, lo: int = 0) -> int:
        # Binary search on times computed on demand: a long video has hundreds of thousands.
        return bisect.bisect_left(frames, seconds - 1e-9, lo=lo, key=index.seconds)

    first = first_at(sampling.start) if sampling.start is not None else 0
    last = first_at(sampling.end) if sampling.end is not None else index.frame_count
    if last <= first:
        raise InvalidRequest(
            f"the window {_window(sampling)} holds no frames: the video's frames run from 0 to {index.duration:.3f} s"
        )
    if sampling.fps is not None:
        origin = index.seconds(first)
        picked: list[int] = []
        for j in range(sampling.num_frames):
            position = first_at(origin + j / sampling.fps, lo=first)
            if position >= last:
                break
            if not picked or position != picked[-1]:
                picked.append(position)
        return picked
    total, wanted = last - first, sampling.num_frames
    if total <= wanted:
        return list(range(first, last))
    stride = total // wanted
    return [first + i * stride for i in range(wanted)]


def _window(sampling: Sampling) -> str:
    if sampling.end is None:
        return f"from {sampling.start:g} s"
    if sampling.start is None:
        return f"before {sampling.end:g} s"
    return f"{sampling.start:g}..{sampling.end:g} s"


def nearest_keyframes(index: StreamIndex, positions: Sequence[int]) -> list[tuple[int, int]]:
    """Fast mode: ``(keyframe position, target position)`` for each target, each keyframe once."""
    keyframe_positions = [index.position_of(pts) for pts in index.keyframe_pts]
    chosen: list[tuple[int, int]] = []
    for target in positions:
        at = bisect.bisect_left(keyframe_positions, target)
        candidates = keyframe_positions[max(0, at - 1) : at + 1]
        best = min(candidates, key=lambda k: (abs(index.pts[k] - index.pts[target]), k))
        if not chosen or chosen[-1][0] != best:
            chosen.append((best, target))
    return chosen


def plan_segments(index: StreamIndex, target_pts: Sequence[int]) -> list[Segment]:
    """Group ascending targets into seeks: the next target joins the current run when no keyframe
    lies between them, because then decoding on costs no more than seeking."""
    segments: list[list[int]] = []
    starts: list[int] = []
    for target in target_pts:
        keyframe = index.keyframe_pts[max(0, bisect.bisect_right(index.keyframe_pts, target) - 1)]
        if segments and keyframe <= segments[-1][-1]:
            segments[-1].append(target)
        else:
            segments.append([target])
            starts.append(keyframe)
    return [Segment(start, tuple(targets)) for start, targets in zip(starts, segments, strict=True)]


def segment_cost(index: StreamIndex, segment: Segment) -> int:
    """Frames decoded for ``segment``: from its keyframe through its last target."""
    return index.position_of(segment.targets[-1]) - index.position_of(segment.start) + 1


def split_segments(index: StreamIndex, segments: Sequence[Segment], parts: int) -> list[list[Segment]]:
    """At most ``parts`` contiguous groups of segments whose largest holds as few frames to
    decode as any such split allows: the slowest process (or thread) sets the time of the whole."""
    costs = [segment_cost(index, s) for s in segments]
    parts = max(1, min(parts, len(segments)))

    def pack(capacity: int) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        load = 0
        for i, c in enumerate(costs):
            if groups[-1] and load + c > capacity:
                groups.append([])
                load = 0
            groups[-1].append(i)
            load += c
        return groups

    # The smallest capacity that still packs into ``parts`` groups (binary search: packing is
    # monotone in the capacity).
    low, high = max(costs, default=0), sum(costs)
    while low < high:
        middle = (low + high) // 2
        if len(pack(middle)) <= parts:
            high = middle
        else:
            low = middle + 1
    return [[segments[i] for i in group] for group in pack(low)]


def decode_segments(path: Path, index: StreamIndex, segments: Sequence[Segment], **options: Any) -> dict[int, Decoded]:
    """Decode the target frames of ``segments``: target pts -> the frame decoded for it
    (``decode_shares``, all shares in one dict)."""
    found: dict[int, Decoded] = {}
    for share in decode_shares(path, index, segments, **options):
        found.update(share)
    return found


def decode_shares(
    path: Path,
    index: StreamIndex,
    segments: Sequence[Segment],
    *,
    threads: int = 0,
    keyframes_only: bool = False,
    opened: av.container.InputContainer | None = None,
) -> Iterator[dict[int, Decoded]]:
    """``decode_segments``, handing over each decoder's frames as soon as it is done with them.

    With ``threads`` of 2 or more and seeks that divide evenly, each thread runs a decoder of its
    own on a contiguous share of the seeks. That beats one decoder with as many frame threads:
    frame threads drain and refill their pipeline at every seek, and a seek often decodes only a
    few frames. Otherwise one decoder runs with ``threads`` threads (0: FFmpeg's choice).
    ``opened``, a container already open on ``path`` whose decoder has not run yet (the one just
    indexed, say), serves the first share instead of opening the file again.
    """
    first: Path | av.container.InputContainer = opened if opened is not None else path
    shares = split_segments(index, segments, threads) if threads >= 2 else [list(segments)]
    costs = [sum(segment_cost(index, s) for s in share) for share in shares]
    if len(shares) < 2 or max(costs) > _EVEN_SHARE * sum(costs):
        yield _decode_on_one(first, index, segments, threads=threads, keyframes_only=keyframes_only)
        return
    per_decoder = max(1, threads // len(shares))
    sources = [first] + [path] * (len(shares) - 1)
    with concurrent.futures.ThreadPoolExecutor(len(shares), thread_name_prefix="decoder") as pool:
        futures = [
            pool.submit(_decode_on_one, source, index, share, threads=per_decoder, keyframes_only=keyframes_only)
            for source, share in zip(sources, shares, strict=True)
        ]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _decode_on_one(
    source: Path | av.container.InputContainer,
    index: StreamIndex,
    segments: Sequence[Segment],
    *,
    threads: int,
    keyframes_only: bool,
) -> dict[int, Decoded]:
    """``decode_segments`` on one decoder, reading ``source`` (a file, or a container open on it).

    A target the decoder cannot produce from its segment's keyframe (a leading frame of an open
    GOP, a damaged frame, a keyframe flag that lies) is tried again from the keyframe before;
    failing that, the first frame after it stands in, and the caller reports that frame's own
    index and the frame it stands in for.
    """
    found: dict[int, Decoded] = {}
    opened = open_input(source) if isinstance(source, Path) else contextlib.nullcontext(source)
    with opened as container:
        stream = container.streams.video[index.stream_index]
        context = stream.codec_context
        # Frame threads hold frames back to fill their pipeline: no use when each seek decodes one.
        context.thread_type = "SLICE" if keyframes_only else "AUTO"
        context.thread_count = threads
        if keyframes_only:
            context.skip_frame = "NONKEY"
        skip_nonref = not keyframes_only and context.name in _SKIPS_NONREF_PER_PACKET
        try:
            for segment in segments:
                pending = list(segment.targets)
                start = segment.start
                while pending:
                    try:
                        missed = _decode_from(container, stream, index, start, pending, found, skip_nonref)
                    except _LandedAmiss:
                        # Read from the start, as decoding every frame does.
                        start = index.keyframe_pts[0]
                        continue
                    if not missed:
                        break
                    earlier = bisect.bisect_left(index.keyframe_pts, start) - 1
                    if earlier >= 0:
                        start, pending = index.keyframe_pts[earlier], missed
                        continue
                    found.update(_substitutes(container, stream, index, missed))
                    break
        except av.FFmpegError as exc:
            if exc.errno == errno.ENOMEM:
                raise InvalidMedia("the video needs more memory to decode than the limit allows") from None
            raise InvalidMedia(f"the video cannot be decoded: {plain_reason(exc)}") from None
        except MemoryError:
            raise InvalidMedia("the video needs more memory to decode than the limit allows") from None
    return found


def _decode_from(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    index: StreamIndex,
    start: int,
    targets: list[int],
    found: dict[int, Decoded],
    skip_nonref: bool,
) -> list[int]:
    """Decode from the keyframe at ``start`` on through ``targets``; return those missed."""
    context = stream.codec_context
    wanted = set(targets)
    remaining = sorted(targets)
    last = remaining[-1]
    missed: list[int] = []
    # After a seek, the keyframe must be the first frame shown from ``start`` on.
    checked = start == index.keyframe_pts[0]
    try:
        for packet in packets_from(container, stream, index.keyframe_pts, start):
            sent = packet.pts if packet.pts is not None else packet.dts
            if skip_nonref:
                context.skip_frame = "DEFAULT" if sent in wanted or sent is None else "NONREF"
            frames = context.decode(packet)
            if sent == last:
                # All the last target depends on is in: drain the decoder rather than feed it frames
                # it would hold back for reordering (or, skipping to keyframes, wait a whole GOP for).
                frames += context.decode(None)
            for frame in frames:
                stamp = frame.pts if frame.pts is not None else frame.dts
                if stamp is None:
                    continue
                if not checked and stamp >= start:
                    if stamp != start:
                        raise _LandedAmiss
                    checked = True
                while remaining and remaining[0] < stamp:
                    missed.append(remaining.pop(0))
                if remaining and remaining[0] == stamp:
                    found[remaining.pop(0)] = Decoded(stamp, to_rgb(frame))
            if not remaining or sent == last:
                break
    finally:
        if skip_nonref:
            context.skip_frame = "DEFAULT"
    return missed + remaining


class _LandedAmiss(Exception):
    """The keyframe a seek reached did not decode as itself: the packets after a seek are not those
    read from the start (an MPEG-PS parser that joins the first frames after a seek does this), or
    the keyframe flag lies."""


def _substitutes(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, index: StreamIndex, targets: list[int]
) -> dict[int, Decoded]:
    """From the very start, the first decodable frame at or after each target."""
    result: dict[int, Decoded] = {}
    remaining = sorted(targets)
    context = stream.codec_context
    context.skip_frame = "DEFAULT"
    packets = packets_from(container, stream, index.keyframe_pts, index.keyframe_pts[0])
    # The demuxer's last, empty packet drains the decoder.
    for frame in (frame for packet in packets for frame in context.decode(packet)):
        stamp = frame.pts if frame.pts is not None else frame.dts
        if stamp is None:
            continue
        if remaining and stamp >= remaining[0]:
            decoded = Decoded(stamp, to_rgb(frame))
            while remaining and stamp >= remaining[0]:
                result[remaining.pop(0)] = decoded
        if not remaining:
            break
    if remaining:
        at = index.seconds(index.position_of(remaining[0]))
        raise InvalidMedia(f"the video's frames from {at:.3f} s on cannot be decoded")
    return result


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """The frame as upright RGB: a phone's display rotation is applied, as players do."""
    rgb: np.ndarray = frame.to_ndarray(format="rgb24")
    turns = _ROTATIONS.get(round(frame.rotation), 0)
    if turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))
    return rgb


def sample_frames(path: Path, sampling: Sampling, *, threads: int = 0) -> list[SampledFrame]:
    """Index, choose and decode in this process (``worker.media.decode`` sandboxes the same steps)."""
    index = index_stream(path)
    return decode_positions(path, index, choose_positions(index, sampling), fast=sampling.fast, threads=threads)


def decode_positions(
    path: Path, index: StreamIndex, positions: Iterable[int], *, fast: bool = False, threads: int = 0
) -> list[SampledFrame]:
    """Decode the frames at ``positions`` (ascending) and wrap them with index and time."""
    positions = list(positions)
    if fast:
        pairs = nearest_keyframes(index, positions)
        segments = [Segment(index.pts[k], (index.pts[k],)) for k, _ in pairs]
        images = decode_segments(path, index, segments, threads=threads, keyframes_only=True)
        return check_stand_ins([sampled_frame(index, k, images[index.pts[k]], target=t) for k, t in pairs])
    targets = [index.pts[p] for p in positions]
    images = decode_segments(path, index, plan_segments(index, targets), threads=threads)
    return check_stand_ins([sampled_frame(index, p, images[index.pts[p]]) for p in positions])


def sampled_frame(index: StreamIndex, wanted: int, decoded: Decoded, target: int | None = None) -> SampledFrame:
    """The frame decoded for the one at position ``wanted`` (fast mode: the keyframe chosen for
    ``target``), with its own index and time: a stand-in reports where it really is."""
    position = index.position_of(decoded.pts)
    time = round(index.seconds(position), 6)
    offset = None if target is None else round(time - index.seconds(target), 6)
    stands_in_for = None if position == wanted else FrameRef(wanted, round(index.seconds(wanted), 6))
    return SampledFrame(index=position, time=time, array=decoded.array, offset=offset, stands_in_for=stands_in_for)


def check_stand_ins(frames: Sequence[SampledFrame]) -> list[SampledFrame]:
    """``frames``, unless most of them stand in for frames that cannot be decoded: an answer from
    a few frames repeated would not be an answer about the video."""
    stand_ins = sum(frame.stands_in_for is not None for frame in frames)
    if stand_ins * 2 > len(frames):
        raise InvalidMedia(
            f"the video cannot be decoded: {stand_ins} of the {len(frames)} frames sampled are damaged or "
            "depend on frames the file does not hold"
        )
    return list(frames)
