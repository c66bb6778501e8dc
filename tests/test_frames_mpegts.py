"""MPEG-TS and MPEG-PS as users send them (broadcast recordings, camcorder ``.mts``/``.m2ts``, HLS
segments, DVD-style ``.mpg``): written straight by the encoder, sampled in this process, in the
sandboxed children and through the running service, against decoding every frame; and segments
cut in the middle of a GOP, whose first frames no decoder can produce."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest

from common.errors import InvalidMedia
from common.schemas import Sampling
from common.settings import load_settings
from tests.conftest import RunningService
from worker.fixtures.synthetic_videos import read_frame_index, write_cat_video
from worker.media.decode import DecodeLimits, decode_frames_in_sandbox
from worker.media.sampling import sample_frames

# name -> (seconds, write_cat_video arguments), 25 fps: the shapes the sampling went wrong on.
REPORTED = {
    "h264.ts": (4, dict(gop=50)),
    "h264.m2ts": (4, dict(gop=50, container_format="mpegts")),
    "mpeg2.mpg": (4, dict(gop=50, codec="mpeg2video", container_format="vob")),
    "mpeg2.ts": (4, dict(gop=50, codec="mpeg2video")),
    "hevc.ts": (4, dict(gop=50, codec="libx265")),
    "h264_long_gop.ts": (20, dict(gop=250)),
}


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mpegts")
    return {
        name: write_cat_video(root / name, seconds=seconds, fps=25, width=96, height=64, **options)
        for name, (seconds, options) in REPORTED.items()
    }


def _decode_everything(path: Path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        first = frames[0].pts
        times = [float((f.pts - first) * stream.time_base) for f in frames]
        return [f.to_ndarray(format="rgb24") for f in frames], times


@pytest.mark.parametrize("name", list(REPORTED))
def test_the_reported_files_sample_exactly(reported: dict[str, Path], name: str) -> None:
    path = reported[name]
    arrays, times = _decode_everything(path)
    wanted = 16 if name == "h264_long_gop.ts" else 8
    step = len(arrays) // wanted
    sampled = sample_frames(path, Sampling(num_frames=wanted))
    assert [frame.index for frame in sampled] == [i * step for i in range(wanted)]
    for frame in sampled:
        assert frame.stands_in_for is None
        assert frame.time == pytest.approx(times[frame.index], abs=1e-6)
        assert read_frame_index(frame.array) == frame.index
        assert np.array_equal(frame.array, arrays[frame.index])


@pytest.mark.service
def test_the_sandboxed_sampler_splits_an_mpegts_file_and_stays_exact(reported: dict[str, Path]) -> None:
    """Two children, each seeking into its own share of a long-GOP file."""
    path = reported["h264_long_gop.ts"]
    arrays, _ = _decode_everything(path)
    limits = DecodeLimits.from_settings(load_settings({"VIDEOQA_DECODE_PROCESSES": "2"}))
    # A 96x64 file decodes faster than a child starts: counted as free, children split it anyway.
    limits = dataclasses.replace(limits, child_start_s=0.0)
    sample = decode_frames_in_sandbox(path, Sampling(num_frames=16), limits)
    assert sample.processes == 2
    assert [frame.index for frame in sample.frames] == [i * 31 for i in range(16)]
    for frame in sample.frames:
        assert np.array_equal(frame.array, arrays[frame.index])


def _cut_segment(directory: Path, gop: int, frame: int) -> Path:
    """A 4 s H.264 MPEG-TS from the 188-byte packet holding ``frame`` (in decode order) on, as an
    HLS segment cut without regard to keyframes starts."""
    source = write_cat_video(directory / f"whole-{gop}.ts", seconds=4, fps=25, width=64, height=64, gop=gop, bframes=2)
    with av.open(str(source)) as container:
        positions = [p.pos for p in container.demux(video=0) if p.size]
    start = positions[frame] - positions[frame] % 188
    target = directory / f"cut-{gop}-{frame}.ts"
    target.write_bytes(source.read_bytes()[start:])
    return target


def _packet_times(path: Path) -> list[float]:
    """Every frame's time from the packets' timestamps, decodable or not."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stamps = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
        return [round(float((s - stamps[0]) * stream.time_base), 6) for s in stamps]


def test_frames_before_a_cut_segments_first_keyframe_are_stood_in_for_and_say_so(tmp_path: Path) -> None:
    """Cut 30 frames into a GOP of 50: the first 20 frames left refer to frames cut away. The three
    targets among them get the keyframe after them, and each says which frame it stands in for;
    every other target is exact."""
    cut = _cut_segment(tmp_path, 50, 30)
    arrays, _ = _decode_everything(cut)
    times = _packet_times(cut)
    sampled = sample_frames(cut, Sampling(num_frames=8))
    stood_in = [frame for frame in sampled if frame.stands_in_for is not None]
    references = [frame.stands_in_for for frame in stood_in]
    assert [frame.index for frame in stood_in] == [20, 20, 20]
    assert [(r.index, r.time) for r in references if r is not None] == [(0, times[0]), (8, times[8]), (16, times[16])]
    assert [f.index for f in sampled if f.stands_in_for is None] == [24, 32, 40, 48, 56]
    for frame in sampled:
        # Decoding every frame gives nothing before the keyframe, which is its first frame.
        assert np.array_equal(frame.array, arrays[frame.index - 20])
        assert read_frame_index(frame.array) == frame.index + 30


def test_a_video_sampled_mostly_from_stand_ins_is_invalid_media(tmp_path: Path) -> None:
    cut = _cut_segment(tmp_path, 80, 5)
    with pytest.raises(InvalidMedia, match="7 of the 8 frames sampled"):
        sample_frames(cut, Sampling(num_frames=8))


def test_an_uploaded_mpegts_file_answers_from_exactly_the_notebook_frames(
    service: RunningService, tmp_path: Path
) -> None:
    video = write_cat_video(tmp_path / "broadcast.ts", seconds=4, fps=25, width=160, height=120, gop=50, bframes=2)
    _, times = _decode_everything(video)
    job = service.wait(service.upload(video, question="What happens?", num_frames="8", max_new_tokens="3"))
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    frames = job["result"]["frames"]
    assert [f["index"] for f in frames] == [0, 12, 24, 36, 48, 60, 72, 84]
    assert [f["time"] for f in frames] == pytest.approx([times[i] for i in range(0, 96, 12)], abs=1e-6)
    assert not any("stands_in_for" in f for f in frames)


def test_an_uploaded_cut_segment_says_which_frames_stand_in_or_fails(service: RunningService, tmp_path: Path) -> None:
    some = _cut_segment(tmp_path, 50, 30)
    times = _packet_times(some)
    job = service.wait(service.upload(some, question="What happens?", num_frames="8", max_new_tokens="3"))
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    frames = job["result"]["frames"]
    assert [f.get("stands_in_for") for f in frames[:3]] == [{"index": i, "time": times[i]} for i in (0, 8, 16)]
    assert [f["index"] for f in frames] == [20, 20, 20, 24, 32, 40, 48, 56]
    assert not any("stands_in_for" in f for f in frames[3:])

    most = _cut_segment(tmp_path, 80, 5)
    job = service.wait(service.upload(most, question="What happens?", num_frames="8", max_new_tokens="3"))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_media"
    assert "7 of the 8 frames sampled" in job["error"]["message"]
