"""Frame sampling on files the suite encodes itself, checked against decoding every frame."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from common.errors import InvalidMedia
from common.schemas import Sampling
from worker.frames import choose_positions, decode_positions, index_stream, sample_frames
from worker.sample_media import write_cat_video


def _decode_everything(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """The reference notebook's way: decode every frame, in presentation order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sorted(container.decode(stream), key=lambda f: f.pts)
        first = frames[0].pts
        return [f.to_ndarray(format="rgb24") for f in frames], [float((f.pts - first) * stream.time_base) for f in frames]


def _notebook_indices(total: int, wanted: int) -> list[int]:
    if total < wanted:
        return list(range(total))
    step = total // wanted
    return [i * step for i in range(wanted)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frames")
    return {
        "h264": write_cat_video(root / "plain.mp4", seconds=3, fps=30),
        "h264_bframes_long_gop": write_cat_video(root / "bframes.mp4", seconds=4, fps=30, gop=50, bframes=3),
        "hevc": write_cat_video(root / "hevc.mp4", seconds=2, fps=25, codec="libx265", gop=20),
        "vp9": write_cat_video(root / "vp9.webm", seconds=2, fps=24, codec="libvpx-vp9", gop=12),
    }


@pytest.mark.parametrize("name", ["h264", "h264_bframes_long_gop", "hevc", "vp9"])
@pytest.mark.parametrize("wanted", [1, 6, 7, 16])
def test_default_strategy_picks_the_notebook_frames_exactly(videos: dict[str, Path], name: str, wanted: int) -> None:
    reference, times = _decode_everything(videos[name])
    sampled = sample_frames(videos[name], Sampling(num_frames=wanted))
    expected = _notebook_indices(len(reference), wanted)
    assert [frame.index for frame in sampled] == expected
    for frame in sampled:
        assert frame.time == pytest.approx(times[frame.index], abs=1e-6)
        assert np.array_equal(np.asarray(frame.image), reference[frame.index]), f"frame {frame.index} differs"


def test_frame_count_comes_from_the_stream(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264_bframes_long_gop"])
    assert index.frame_count == 120
    assert index.pts == sorted(index.pts)
    assert len(index.keyframe_pts) >= 3


def test_a_video_shorter_than_asked_gives_every_frame_once(tmp_path: Path) -> None:
    path = write_cat_video(tmp_path / "short.mp4", seconds=0.2, fps=20)
    sampled = sample_frames(path, Sampling(num_frames=8))
    assert [frame.index for frame in sampled] == [0, 1, 2, 3]


def test_fps_strategy_takes_one_frame_per_interval(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264"])
    assert choose_positions(index, Sampling(num_frames=32, fps=2)) == [0, 15, 30, 45, 60, 75]
    assert choose_positions(index, Sampling(num_frames=3, fps=2)) == [0, 15, 30]


def test_window_restricts_the_frames(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264"])
    positions = choose_positions(index, Sampling(num_frames=4, start=1.0, end=2.0))
    assert positions == [30, 37, 44, 51]
    with pytest.raises(InvalidMedia, match="holds no frames"):
        choose_positions(index, Sampling(num_frames=4, start=10.0))


def test_decoding_out_of_order_targets_is_not_needed_but_repeat_seeks_work(videos: dict[str, Path]) -> None:
    path = videos["h264_bframes_long_gop"]
    index = index_stream(path)
    reference, _ = _decode_everything(path)
    positions = [0, 1, 49, 50, 51, 99, 119]
    for frame in decode_positions(path, index, positions):
        assert np.array_equal(np.asarray(frame.image), reference[frame.index])


def test_files_that_are_not_video_are_invalid_media(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    with pytest.raises(InvalidMedia):
        sample_frames(text, Sampling())

    audio = tmp_path / "sound.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidMedia, match="no video stream"):
        sample_frames(audio, Sampling())

    truncated = tmp_path / "truncated.mp4"
    whole = write_cat_video(tmp_path / "whole.mp4", seconds=1)
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(InvalidMedia):
        sample_frames(truncated, Sampling())
