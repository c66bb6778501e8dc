"""Frame sampling against decoding every frame, on every container FFmpeg here writes, every codec
it encodes, several GOP structures and every strategy: the sampled indices, times and pixels must
be decode-every-frame's (for ``fast``, those of the nearest keyframes).

Each codec and GOP structure is encoded once, small and short, and copied into each container
without re-encoding (as ``ffmpeg -c copy`` would), when the session first needs it: from an MP4
(codec set-up in the header) into the containers that keep it there, from an MPEG-TS (set-up in
the stream, as encoders write it for broadcast) into MPEG-TS and MPEG-PS. A pair FFmpeg here
cannot write, or writes as something it does not read back as that video, is skipped with the
reason.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from common.errors import InvalidMedia
from common.schemas import Sampling
from worker.fixtures.synthetic_videos import remux, write_cat_video
from worker.media.sampling import (
    SampledFrame,
    check_stand_ins,
    choose_positions,
    decode_segments,
    index_stream,
    plan_segments,
    sample_frames,
    sampled_frame,
    split_segments,
)

IN_STREAM = {"mpegts", "vob"}
AVI_IN_STREAM = {"h264", "h264_bframes"}
FPS = 25
SECONDS = 2
# Irregular gaps, some a few milliseconds, one long: a phone's or a screen recorder's timing.
VFR_TIMES = [round(i * 0.04 + (0.013 if i % 7 == 3 else 0) + (0.3 if i >= 30 else 0), 3) for i in range(45)]

# name -> (encoder, encoder arguments)
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "h264": ("libx264", dict(bframes=0)),
    "h264_bframes": ("libx264", dict(bframes=3)),
    "hevc": ("libx265", dict(bframes=3)),
    "mpeg2": ("mpeg2video", dict(bframes=2)),
    "mpeg4": ("mpeg4", dict(bframes=2)),
    "vp8": ("libvpx", {}),
    "vp9": ("libvpx-vp9", {}),
    "av1": ("libsvtav1", {}),
}
GOPS: dict[str, dict[str, Any]] = {
    "short_gop": dict(gop=5),
    "long_gop": dict(gop=24),
    "open_gop": dict(gop=10, open_gop=True),
    "vfr": dict(gop=10, frame_times=VFR_TIMES),
}
# Open GOPs need B-frames; MPEG-2 allows only its standard frame rates.
CODEC_GOPS = {
    "h264": ["short_gop", "long_gop", "vfr"],
    "h264_bframes": list(GOPS),
    "hevc": list(GOPS),
    "mpeg2": ["short_gop", "long_gop", "open_gop"],
    "mpeg4": list(GOPS),
    "vp8": ["short_gop", "long_gop", "vfr"],
    "vp9": ["short_gop", "long_gop", "vfr"],
    "av1": ["short_gop", "long_gop", "vfr"],
}
# name -> (file name, remux arguments); AVI has no timestamps of its own, so no variable frame rate.
# MPEG-TS and MPEG-PS carry the codec set-up in the stream, and so do AVI files of H.264: they
# are copied from an MPEG-TS.
CONTAINERS: dict[str, tuple[str, dict[str, Any]]] = {
    "mp4": ("v.mp4", {}),
    "mov": ("v.mov", {}),
    "mkv": ("v.mkv", {}),
    "webm": ("v.webm", {}),
    "ts": ("v.ts", dict(container_format="mpegts")),
    "m2ts": ("v.m2ts", dict(container_format="mpegts")),
    "mpg": ("v.mpg", dict(container_format="vob")),
    "flv": ("v.flv", {}),
    "avi": ("v.avi", {}),
    "3gp": ("v.3gp", {}),
    "mkv_pipe": ("pipe.mkv", dict(to_pipe=True)),
    "webm_pipe": ("pipe.webm", dict(to_pipe=True)),
    "mp4_fragmented": ("frag.mp4", dict(fragmented=True)),
}
STRATEGIES: dict[str, Sampling] = {
    "default": Sampling(num_frames=7),
    "fps": Sampling(num_frames=32, fps=3),
    "window": Sampling(num_frames=5, start=0.5, end=1.7),
    "fast": Sampling(num_frames=6, fast=True),
}
CELLS = [
    (container, codec, gop, strategy)
    for container in CONTAINERS
    for codec in CODECS
    for gop in CODEC_GOPS[codec]
    if not (gop == "vfr" and container == "avi")
    for strategy in STRATEGIES
]


@dataclass(frozen=True)
class Reference:
    """Decoding every frame, in the order the decoder shows them."""

    arrays: list[np.ndarray]
    times: list[float]
    keyframes: list[int]  # positions of the frames whose packets are keyframes
    # Whether FFmpeg itself can place every frame in time: when it cannot, which frame is shown
    # when is unknown, and the sampler must say so.
    placed: bool = True


class Matrix:
    """The files of the matrix, made when first asked for, and their references."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.masters: dict[tuple[str, str, bool], Path] = {}
        self.files: dict[tuple[str, str, str], Path | str] = {}
        self.references: dict[Path, Reference] = {}

    def path(self, container: str, codec: str, gop: str) -> Path:
        key = (container, codec, gop)
        if key not in self.files:
            name, options = CONTAINERS[container]
            target = self.root / container / f"{codec}-{gop}-{name}"
            in_stream = options.get("container_format") in IN_STREAM or (container == "avi" and codec in AVI_IN_STREAM)
            master = self._master(codec, gop, in_stream=in_stream)
            try:
                self.files[key] = _readable(remux(master, target, **options), CODECS[codec][0])
            except (av.FFmpegError, ValueError) as exc:
                self.files[key] = f"FFmpeg here cannot put {codec} in {container}: {exc}"
        found = self.files[key]
        if isinstance(found, str):
            pytest.skip(found)
        return found

    def _master(self, codec: str, gop: str, in_stream: bool) -> Path:
        key = (codec, gop, in_stream)
        if key not in self.masters:
            encoder, options = CODECS[codec]
            # MP4 keeps every packet's decode timestamp; VP8 goes in WebM, as MP4 cannot hold it.
            suffix = "ts" if in_stream else "webm" if codec == "vp8" else "mp4"
            self.masters[key] = write_cat_video(
                self.root / "masters" / f"{codec}-{gop}.{suffix}",
                seconds=SECONDS, fps=FPS, width=64, height=64, codec=encoder, **options, **GOPS[gop],
                container_format="mpegts" if in_stream else None,
            )  # fmt: skip
        return self.masters[key]

    def reference(self, path: Path) -> Reference:
        if path not in self.references:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                time_base = stream.time_base
                frames = list(container.decode(stream))
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                keyframe_pts = {p.pts for p in container.demux(stream) if p.is_keyframe and p.size}
            pts = [frame.pts for frame in frames]
            if None in pts or pts != sorted(pts):
                self.references[path] = Reference([], [], [], placed=False)
                return self.references[path]
            self.references[path] = Reference(
                arrays=[frame.to_ndarray(format="rgb24") for frame in frames],
                times=[float((p - pts[0]) * time_base) for p in pts],
                keyframes=[i for i, p in enumerate(pts) if p in keyframe_pts],
            )
        return self.references[path]


def _readable(path: Path, encoder: str) -> Path:
    """``path``, if FFmpeg reads it back as a video of the codec written (the MPEG-TS muxer, for
    one, writes VP9 as a data stream)."""
    with av.open(str(path)) as container:
        streams = container.streams.video
        decoder = streams[0].codec_context.codec if streams else None
    if decoder is None or decoder.id != av.codec.Codec(encoder, "w").id:
        raise ValueError(f"it reads back as {decoder.name if decoder else 'no video stream'}")
    return path


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("matrix"))


def _first_at(times: list[float], seconds: float) -> int:
    return bisect.bisect_left(times, seconds - 1e-9)


def _every_kth(first: int, last: int, wanted: int) -> list[int]:
    if last - first <= wanted:
        return list(range(first, last))
    return [first + i * ((last - first) // wanted) for i in range(wanted)]


def sampled_gop_by_gop(path: Path, sampling: Sampling) -> list[SampledFrame]:
    """As the sandbox samples a video split by GOP over children: every seek a group of its own,
    each group decoded by a decoder of its own, the frames put together as the caller does."""
    index = index_stream(path)
    positions = choose_positions(index, sampling)
    segments = plan_segments(index, [index.pts[p] for p in positions])
    found = {}
    for group in split_segments(index, segments, len(segments)):
        found.update(decode_segments(path, index, group, threads=1))
    return check_stand_ins([sampled_frame(index, p, found[index.pts[p]]) for p in positions])


def expected_positions(times: list[float], sampling: Sampling) -> list[int]:
    """What each strategy picks, worked out from decode-every-frame's times alone."""
    first = _first_at(times, sampling.start) if sampling.start is not None else 0
    last = _first_at(times, sampling.end) if sampling.end is not None else len(times)
    if sampling.fps is None:
        return _every_kth(first, last, sampling.num_frames)
    picked: list[int] = []
    for j in range(sampling.num_frames):
        at = _first_at(times, times[first] + j / sampling.fps)
        if at >= last:
            break
        if at not in picked:
            picked.append(at)
    return picked


@pytest.mark.parametrize(("container", "codec", "gop", "strategy"), CELLS, ids=["-".join(cell) for cell in CELLS])
def test_sampling_equals_decoding_every_frame(
    matrix: Matrix, container: str, codec: str, gop: str, strategy: str
) -> None:
    path = matrix.path(container, codec, gop)
    reference = matrix.reference(path)
    sampling = STRATEGIES[strategy]
    if not reference.placed:
        # FFmpeg's MPEG-PS muxer packs several of these tiny frames in one packet and stamps only
        # the first; AVI keeps no presentation times for H.264's B-frames. No sampler can tell
        # which frame is shown when, and this one says so.
        with pytest.raises(InvalidMedia, match="placed in time"):
            sample_frames(path, sampling, threads=1)
        return
    sampled = sample_frames(path, sampling, threads=1)
    targets = expected_positions(reference.times, sampling)
    if sampling.fast:
        # The nearest keyframe to each target (the earlier one on a tie), each keyframe once.
        chosen: list[tuple[int, int]] = []
        for target in targets:
            best = min(reference.keyframes, key=lambda k: (abs(reference.times[k] - reference.times[target]), k))
            if not chosen or chosen[-1][0] != best:
                chosen.append((best, target))
        wanted = [(k, round(reference.times[k] - reference.times[t], 6)) for k, t in chosen]
        assert [(frame.index, frame.offset) for frame in sampled] == wanted
    else:
        assert [frame.index for frame in sampled] == targets
    for frame in sampled:
        assert frame.stands_in_for is None
        assert frame.time == pytest.approx(reference.times[frame.index], abs=1e-6)
        assert np.array_equal(frame.array, reference.arrays[frame.index]), f"frame {frame.index} differs"
    if not sampling.fast:
        split = sampled_gop_by_gop(path, sampling)
        assert [(f.index, f.time) for f in split] == [(f.index, f.time) for f in sampled]
        for one, other in zip(split, sampled, strict=True):
            assert np.array_equal(one.array, other.array), f"frame {one.index} differs split by GOP"
