"""Sampling a video in sandboxed child processes (``worker.sandbox.runner``), so a decoder that crashes,
hangs or eats memory ends one job ``invalid_media`` and never the worker.

A first child probes the file, indexes its packets, chooses the frames and plans the seeks. When
the worker has cores to spare and the plan's estimated decoding time outweighs what another child
costs to start, the seeks are split by GOP into groups of about equal work, short videos as well as
long ones: the first child hands the plan over and decodes the first group while the caller starts
one child for each other group. Children resize the frames to the model's geometry when asked (on
the threads they have), so only small frames travel back.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Generator
from pathlib import Path

import av
import numpy as np
from PIL import Image

from common.schemas import Sampling
from common.settings import Settings
from worker.media.errors import plain_reason
from worker.media.geometry import FrameGeometry
from worker.media.probe import MediaInfo, MediaLimits, check_index, open_checked
from worker.media.sampling import (
    Decoded,
    FramePlan,
    SampledFrame,
    Segment,
    StreamIndex,
    choose_positions,
    decode_shares,
    index_container,
    plan_frames,
    segment_cost,
    split_segments,
)
from worker.sandbox.runner import Answer, ChildSetup, Session, available_cores

# The media's sandbox: its fork server preloads the decoding stack, and an unexpected exception
# in a child reads as FFmpeg's or Pillow's plain reason.
MEDIA_SANDBOX = ChildSetup(preload=("worker.media.decode", "worker.media.still_image"), describe_error=plain_reason)

# The plan's cost model, from the 1080p H.264 clip of bench/short_hd.py on one core: the seconds
# one frame between a seek's keyframe and its last target costs, per megapixel (about half of them
# are references that must be decoded, the others are skipped), and what each target costs on top
# (its conversion to RGB and the resize to the model's geometry).
_SPAN_S_PER_MEGAPIXEL = 0.0008
_TARGET_S_PER_MEGAPIXEL = 0.005
# What one more sandboxed child costs the wall clock: its fork, its confinement and its socket,
# started by the caller one after another (tens of milliseconds on a busy machine).
CHILD_START_S = 0.03
_MAX_THREADS = 8


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    media: MediaLimits
    memory_bytes: int
    deadline_s: float
    processes: int
    # What the plan counts for each child beyond the first (0: split whenever that shortens the
    # largest group, however little there is to decode).
    child_start_s: float = CHILD_START_S

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(
            media=MediaLimits.from_settings(settings),
            memory_bytes=settings.decode_memory_mb * 1024 * 1024,
            deadline_s=settings.decode_timeout_s,
            processes=settings.decode_processes,
        )


@dataclasses.dataclass(frozen=True)
class VideoSample:
    info: MediaInfo
    frame_count: int
    frames: list[SampledFrame]
    # Seconds from the first frame to the last, from the stream's timestamps.
    duration: float
    processes: int
    # Resident set of the children at their peaks, those running at once added up (bytes). An upper
    # bound: pages the children share with the fork server count once per child.
    peak_rss_sum: int
    # Seconds until the plan was in: the first child's start, probing, indexing and planning.
    plan_seconds: float = 0.0


def decode_frames_in_sandbox(
    path: Path, sampling: Sampling, limits: DecodeLimits, *, geometry: FrameGeometry | None = None
) -> VideoSample:
    """Probe, index, choose and decode ``path`` in child processes; frames resized to ``geometry``
    when given (in the children, so only small frames travel back).

    One child probes, indexes and plans, hands the plan over and decodes the first group of seeks;
    meanwhile the caller starts one child for each other group, when the plan has more than one.
    """
    started = time.monotonic()
    deadline = started + limits.deadline_s
    cores = available_cores()
    processes = limits.processes or cores
    with Session(
        limits.memory_bytes, deadline, limits.deadline_s, answer_types=_ANSWER_TYPES, setup=MEDIA_SANDBOX
    ) as session:
        split = _Split(processes, limits.child_start_s)
        first = session.start(_probe_and_sample, (path, sampling, limits.media, split, cores, geometry))
        (info, index, plan), _ = session.next_answer(first)
        planned = time.monotonic()
        threads = _threads(cores, len(plan.groups))
        others = [
            session.start(_decode, (path, index, group, threads, sampling.fast, geometry)) for group in plan.groups[1:]
        ]
        session.finish()
    decoded: dict[int, Decoded] = {}
    # Every answer but the first child's plan holds frames.
    for stamps, found in first.answers[1:] + [answer for child in others for answer in child.answers]:
        decoded.update({target: Decoded(pts, array) for (target, pts), array in zip(stamps, found, strict=True)})
    frames = plan.frames.frames(index, decoded)
    return VideoSample(
        info=info,
        frame_count=index.frame_count,
        frames=frames,
        duration=index.duration,
        processes=len(plan.groups),
        # All of them run at once: the first decodes its share while the others decode theirs.
        peak_rss_sum=sum(child.peak for child in (first, *others)),
        plan_seconds=planned - started,
    )


@dataclasses.dataclass(frozen=True)
class _Split:
    """How far the plan may split: at most ``processes`` children, each beyond the first counted
    as ``child_start_s`` seconds."""

    processes: int
    child_start_s: float


@dataclasses.dataclass(frozen=True)
class _Plan:
    frames: FramePlan
    # The plan's seeks, split into one group per process.
    groups: list[list[Segment]]


def _plan(index: StreamIndex, sampling: Sampling, split: _Split, pixels: int) -> _Plan:
    plan = plan_frames(index, choose_positions(index, sampling), fast=sampling.fast)
    if sampling.fast:
        return _Plan(plan, [plan.segments])
    return _Plan(plan, split_by_cost(index, plan.segments, pixels, split.processes, split.child_start_s))


def split_by_cost(
    index: StreamIndex, segments: list[Segment], pixels: int, processes: int, child_start_s: float = CHILD_START_S
) -> list[list[Segment]]:
    """The split of ``segments`` (contiguous, balanced: ``split_segments``) over at most ``processes``
    children that the plan's estimate says ends soonest: the largest group's decoding time plus
    what starting each extra child costs. A short HD clip that needs most of its frames decoded
    gets one child per GOP when there are cores for them; a small or cheap one stays in one child."""
    megapixels = pixels / 1e6

    def seconds(group: list[Segment]) -> float:
        span = sum(segment_cost(index, s) for s in group)
        targets = sum(len(s.targets) for s in group)
        return megapixels * (span * _SPAN_S_PER_MEGAPIXEL + targets * _TARGET_S_PER_MEGAPIXEL)

    best, best_s = [list(segments)], seconds(list(segments))
    for parts in range(2, min(processes, len(segments)) + 1):
        groups = split_segments(index, segments, parts)
        estimate = max(seconds(g) for g in groups) + (len(groups) - 1) * child_start_s
        if estimate < best_s:
            best, best_s = groups, estimate
    return best


# What the children's answers may hold besides builtin values (worker.sandbox.runner rebuilds no other class).
_ANSWER_TYPES = (MediaInfo, StreamIndex, Segment, FramePlan, _Plan)


def _threads(cores: int, processes: int) -> int:
    # The cores left to each process go to its decoder's threads (FFmpeg gains little past 8).
    return min(_MAX_THREADS, max(1, cores // processes))


# --- what runs in the children ---------------------------------------------------------------


def _probe_and_sample(
    path: Path, sampling: Sampling, limits: MediaLimits, split: _Split, cores: int, geometry: FrameGeometry | None
) -> Generator[Answer, None, Answer]:
    """Yields the plan (so the caller can start the other groups at once), then the first group's
    frames as ``_decode`` hands them over."""
    container, info = open_checked(path, limits)
    with container:
        index = index_container(container)
        check_index(index, limits)
        plan = _plan(index, sampling, split, info.width * info.height)
        yield (info, index, plan), []
        threads = _threads(cores, len(plan.groups))
        return (yield from _decode(path, index, plan.groups[0], threads, sampling.fast, geometry, opened=container))


def _decode(
    path: Path,
    index: StreamIndex,
    segments: list[Segment],
    threads: int,
    keyframes_only: bool,
    geometry: FrameGeometry | None,
    opened: av.container.InputContainer | None = None,
) -> Generator[Answer, None, Answer]:
    """Each decoder's frames as one answer, sent while the other decoders go on: a decoder that
    finishes early hands its frames over on the core it frees."""
    shares = decode_shares(path, index, segments, threads=threads, keyframes_only=keyframes_only, opened=opened)
    answer = _frames_answer(next(shares), geometry, threads)
    for share in shares:
        yield answer
        answer = _frames_answer(share, geometry, threads)
    return answer


def _frames_answer(found: dict[int, Decoded], geometry: FrameGeometry | None, threads: int = 1) -> Answer:
    targets = sorted(found)
    arrays = [found[t].array for t in targets]
    if geometry is not None:

        def resize(array: np.ndarray) -> np.ndarray:
            return np.asarray(geometry.resize(Image.fromarray(array)))

        if threads >= 2 and len(arrays) >= 2:
            # Pillow resamples without the GIL: a full-size frame takes ~10 ms, so the process's
            # threads share the frames.
            with concurrent.futures.ThreadPoolExecutor(min(threads, len(arrays)), thread_name_prefix="resize") as pool:
                arrays = list(pool.map(resize, arrays))
        else:
            arrays = [resize(a) for a in arrays]
    return [(t, found[t].pts) for t in targets], arrays
