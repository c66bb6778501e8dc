"""Sampling in sandboxed child processes: the same frames as in-process, spread over processes,
and a decoder that runs out of memory, crashes or hangs ends the sampling, not the process."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import InvalidMedia, InvalidRequest, MediaTooLarge
from common.schemas import Sampling
from common.settings import load_settings
from common.storage import LocalStore, ObjectStore, S3Store
from worker.cpu.stage import store_frames
from worker.fixtures.synthetic_videos import read_frame_index, write_cat_video
from worker.media.decode import DecodeLimits, VideoSample, decode_frames_in_sandbox
from worker.media.geometry import FrameGeometry
from worker.media.png import decode_png
from worker.media.sampling import sample_frames
from worker.sandbox.runner import Session, run_isolated, run_until

# Every test decodes in the sandbox's own server process.
pytestmark = pytest.mark.service

LIMITS = DecodeLimits.from_settings(load_settings({}))


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Long enough (in frames to decode) to be split between two processes.
    return write_cat_video(tmp_path_factory.mktemp("sandbox") / "long.mp4", seconds=10, fps=30, width=160,
                           height=120, gop=45, bframes=2)  # fmt: skip


def _limits(**changes: object) -> DecodeLimits:
    return dataclasses.replace(LIMITS, **changes)


def _sample(path: Path, sampling: Sampling, limits: DecodeLimits = LIMITS, **kwargs: object) -> VideoSample:
    return decode_frames_in_sandbox(path, sampling, limits, **kwargs)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("sampling", [Sampling(num_frames=16), Sampling(num_frames=5, fps=2, start=1.5)])
def test_children_give_the_frames_of_in_process_decoding(long_video: Path, processes: int, sampling: Sampling) -> None:
    expected = sample_frames(long_video, sampling)
    # Children counted as free: the plan splits this small video as it would a large one.
    sample = _sample(long_video, sampling, _limits(processes=processes, child_start_s=0.0))
    assert sample.frame_count == 300
    assert [(f.index, f.time) for f in sample.frames] == [(f.index, f.time) for f in expected]
    for got, want in zip(sample.frames, expected, strict=True):
        assert np.array_equal(got.array, want.array)
    if sampling.fps is None:
        assert sample.processes == processes


def test_a_small_video_stays_in_one_child(long_video: Path) -> None:
    """Decoding 300 frames of 160x120 costs less than starting a second child."""
    sample = _sample(long_video, Sampling(num_frames=16), _limits(processes=4))
    assert sample.processes == 1


def test_the_plan_splits_by_gop_when_decoding_outweighs_a_child() -> None:
    """A 20 s clip of 600 frames, keyframes every 250, 12 targets: three seeks decoding 201, 201
    and 51 frames. In 1080p each GOP gets a child of its own; in 64x64 it all stays in one."""
    from fractions import Fraction

    from worker.media.decode import split_by_cost
    from worker.media.sampling import StreamIndex, plan_segments

    index = StreamIndex(pts=list(range(600)), keyframe_pts=[0, 250, 500], time_base=Fraction(1, 30))
    segments = plan_segments(index, list(range(0, 600, 50)))
    assert [s.start for s in segments] == [0, 250, 500]
    assert split_by_cost(index, segments, 1920 * 1080, processes=8) == [[s] for s in segments]
    assert split_by_cost(index, segments, 1920 * 1080, processes=2) == [segments[:1], segments[1:]]
    assert split_by_cost(index, segments, 1920 * 1080, processes=1) == [segments]
    assert split_by_cost(index, segments, 64 * 64, processes=8) == [segments]


@pytest.fixture(scope="module")
def short_hd_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bench/short_hd.py's clip: 20 s of 1080p H.264, GOP 250, three B-frames.
    return write_cat_video(tmp_path_factory.mktemp("short_hd") / "hd.mp4", seconds=20, fps=30, width=1920,
                           height=1080, gop=250, bframes=3, preset="veryfast", threads=2)  # fmt: skip


def test_a_short_hd_clip_split_by_gop_gives_the_frames_of_one_child(short_hd_clip: Path) -> None:
    alone = _sample(short_hd_clip, Sampling(num_frames=12), _limits(processes=1))
    split = _sample(short_hd_clip, Sampling(num_frames=12), _limits(processes=3))
    assert (alone.processes, split.processes) == (1, 3)
    assert [f.index for f in split.frames] == [i * 50 for i in range(12)]
    assert [(f.index, f.time) for f in split.frames] == [(f.index, f.time) for f in alone.frames]
    for got, want in zip(split.frames, alone.frames, strict=True):
        assert np.array_equal(got.array, want.array), f"frame {got.index} differs"
        assert read_frame_index(got.array) == got.index


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_stored_frames_read_back_as_the_pixels_sampled(
    short_hd_clip: Path, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Frames are stored on threads, lossless: what the GPU side reads is what was sampled."""
    geometry = FrameGeometry(384, 384, Image.Resampling.BICUBIC)
    sample = _sample(short_hd_clip, Sampling(num_frames=12), geometry=geometry)
    if backend == "s3":
        request.getfixturevalue("s3")  # moto's server, and this process's AWS variables
        store: ObjectStore = S3Store(f"frames-{uuid.uuid4().hex[:12]}", "p")
    else:
        store = LocalStore(tmp_path / "store")
    entries = store_frames(store, "frames/clip", sample.frames)
    assert [(e.index, e.time) for e in entries] == [(f.index, f.time) for f in sample.frames]
    assert [e.key for e in entries] == [f"frames/clip/{i:04d}.png" for i in range(12)]
    for entry, frame in zip(entries, sample.frames, strict=True):
        read = np.asarray(decode_png(store.get_bytes(entry.key)))
        assert read.shape == (384, 384, 3)
        assert np.array_equal(read, frame.array), f"frame {frame.index} differs once stored"


def test_children_resize_as_the_model_would(long_video: Path) -> None:
    geometry = FrameGeometry(64, 48, Image.Resampling.BICUBIC)
    expected = sample_frames(long_video, Sampling(num_frames=4))
    sample = _sample(long_video, Sampling(num_frames=4), geometry=geometry)
    for got, want in zip(sample.frames, expected, strict=True):
        assert got.array.shape == (48, 64, 3)
        assert np.array_equal(got.array, np.asarray(geometry.resize(want.image)))


def test_fast_mode_in_children_reports_offsets(long_video: Path) -> None:
    sample = _sample(long_video, Sampling(num_frames=8, fast=True))
    assert all(f.index % 45 == 0 for f in sample.frames)
    assert all(f.offset is not None and abs(f.offset) <= 22.5 / 30 + 1e-6 for f in sample.frames)
    assert [read_frame_index(f.array) for f in sample.frames] == [f.index for f in sample.frames]


def test_a_window_outside_the_video_is_a_bad_request(long_video: Path) -> None:
    with pytest.raises(InvalidRequest, match="holds no frames"):
        _sample(long_video, Sampling(num_frames=4, start=30.0, end=40.0))


def test_limits_hold_when_the_header_declares_nothing(tmp_path: Path) -> None:
    # Written to a pipe: no duration and no frame count in the file; the stream still counts.
    path = write_cat_video(tmp_path / "pipe.mkv", seconds=3, fps=20, width=96, height=64, to_pipe=True)
    with pytest.raises(MediaTooLarge, match=r"60 frames; the limit is 50 \(VIDEOQA_MAX_VIDEO_FRAMES"):
        _sample(path, Sampling(), _limits(media=dataclasses.replace(LIMITS.media, max_frames=50)))
    with pytest.raises(MediaTooLarge, match="VIDEOQA_MAX_VIDEO_SECONDS"):
        _sample(path, Sampling(), _limits(media=dataclasses.replace(LIMITS.media, max_seconds=2.5)))


def test_a_decoder_out_of_memory_fails_the_video_and_the_next_one_decodes(tmp_path: Path, long_video: Path) -> None:
    big = write_cat_video(tmp_path / "uhd.mp4", seconds=0.2, fps=30, width=3840, height=2160)
    # Enough for small frames, not for a 4K decoder's buffers.
    tight = _limits(memory_bytes=220 * 1024 * 1024)
    with pytest.raises(InvalidMedia):
        _sample(big, Sampling(num_frames=4), tight)
    assert [f.index for f in _sample(long_video, Sampling(num_frames=4), tight).frames] == [0, 75, 150, 225]


def test_a_decode_past_the_deadline_is_stopped(tmp_path: Path) -> None:
    # Seconds of decoding (one GOP of 180 frames) against a 0.05 s deadline: a worker kept off
    # the CPU by a busy machine for less than that still sees the deadline pass first.
    path = write_cat_video(tmp_path / "hd.mp4", seconds=6, fps=30, width=1280, height=720, gop=180)
    with pytest.raises(InvalidMedia, match=r"longer than 0\.05 s \(VIDEOQA_DECODE_TIMEOUT_S"):
        _sample(path, Sampling(num_frames=16), _limits(deadline_s=0.05))


def _crash() -> None:
    # Stands in for a decoder bug: the child dies by a signal, as a segfaulting library would.
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def test_a_crashing_child_fails_the_video_not_the_caller(long_video: Path) -> None:
    with pytest.raises(InvalidMedia, match=r"crashed \(SIGSEGV"):
        run_isolated([(_crash, ())], LIMITS.memory_bytes, LIMITS.deadline_s)
    assert len(_sample(long_video, Sampling(num_frames=2)).frames) == 2


def test_a_hanging_child_is_killed_at_the_deadline(tmp_path: Path, long_video: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(InvalidMedia, match="longer than"):
        run_isolated([(_hang, (str(pid_file),))], LIMITS.memory_bytes, 3.0)
    pid = int(pid_file.read_text())
    # The kill is asynchronous: give the fork server a moment to deliver it and reap the child.
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {pid} still runs after its deadline")
    assert len(_sample(long_video, Sampling(num_frames=2)).frames) == 2


def _plan_then_work(release_file: str):
    # Hands over a plan, then works on until the caller has acted on it (the release file).
    yield {"pid": os.getpid()}, []
    while not Path(release_file).exists():
        time.sleep(0.01)
    return "done", [np.arange(6, dtype=np.int32).reshape(2, 3)]


def _plan_then_crash():
    yield "plan", []
    os.kill(os.getpid(), signal.SIGSEGV)
    return None, []


def test_a_child_hands_over_its_plan_while_it_goes_on(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with Session(LIMITS.memory_bytes, time.monotonic() + 30, 30) as session:
        child = session.start(_plan_then_work, (str(release),))
        plan, arrays = session.next_answer(child)
        # The child is still running: its last answer waits for what the caller does next.
        assert arrays == [] and not child.finished
        os.kill(plan["pid"], 0)
        release.touch()
        session.finish()
    payload, (array,) = child.answers[-1]
    assert payload == "done" and array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_child_that_dies_after_its_plan_fails_the_session() -> None:
    with Session(LIMITS.memory_bytes, time.monotonic() + 30, 30) as session:
        child = session.start(_plan_then_crash, ())
        assert session.next_answer(child) == ("plan", [])
        with pytest.raises(InvalidMedia, match=r"crashed \(SIGSEGV"):
            session.finish()


def _mixed_arrays(seed: int) -> tuple[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return "mixed", [
        rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8),
        rng.standard_normal((3, 5)).astype(np.float32),
        np.arange(7, dtype=np.int64),
        rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
    ]


def test_arrays_of_any_shape_and_type_come_back_exactly_and_writable() -> None:
    ((payload, arrays),) = run_isolated([(_mixed_arrays, (7,))], LIMITS.memory_bytes, LIMITS.deadline_s)
    _, expected = _mixed_arrays(7)
    assert payload == "mixed"
    for got, want in zip(arrays, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
        got[...] = 0  # the caller owns what it received
    assert not arrays[0].any()


class _RunsCode:
    """What a subverted decoder could send: unpickling it would run a command in the caller."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def _answer_with_code(marker: str) -> tuple[object, list[np.ndarray]]:
    return _RunsCode(marker), []


def _answer_claiming_a_terabyte() -> tuple[None, list[np.ndarray]]:
    # A view of one byte that says it is 1 TiB: the header would make the caller allocate that.
    return None, [np.broadcast_to(np.uint8(0), (1 << 20, 1 << 20))]


def test_an_answer_that_would_run_code_in_the_caller_is_refused(tmp_path: Path, long_video: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(InvalidMedia, match=r"answer was refused: UnpicklingError: posix\.system may not appear"):
        run_isolated([(_answer_with_code, (str(marker),))], LIMITS.memory_bytes, LIMITS.deadline_s)
    assert not marker.exists()
    assert len(_sample(long_video, Sampling(num_frames=2)).frames) == 2


def test_an_answer_larger_than_the_childs_memory_limit_is_refused() -> None:
    with pytest.raises(InvalidMedia, match="claim 1099511627776 bytes, more than its memory limit"):
        run_isolated([(_answer_claiming_a_terabyte, ())], LIMITS.memory_bytes, LIMITS.deadline_s)


def _answers_adding_up(size: int, count: int) -> Generator[tuple[None, list[np.ndarray]], None, tuple[None, list]]:
    for _ in range(count):
        yield None, [np.broadcast_to(np.uint8(1), (size,))]
    return None, []


def test_answers_adding_up_to_more_than_the_childs_memory_limit_are_refused() -> None:
    """Each answer alone fits the limit; the caller stops at the one that takes the sum past it."""
    limit = 256 * 1024 * 1024
    answers, _ = run_until([(_answers_adding_up, (limit // 4, 3))], limit, time.monotonic() + 60, 60)
    assert answers == [(None, [])]
    with pytest.raises(InvalidMedia, match=f"claim {5 * (limit // 4)} bytes, more than its memory limit"):
        run_isolated([(_answers_adding_up, (limit // 4, 5))], limit, 60)
