"""Files built to exhaust a decoder, refused at the probe under the default limits, before any
frame is decoded."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from common.errors import MediaTooLarge
from common.settings import load_settings
from worker.media.probe import MediaLimits, probe

DEFAULTS = MediaLimits.from_settings(load_settings({}))


def _video(path: Path, width: int, height: int, stamps: list[int], time_base: Fraction, audio_streams: int = 0) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        for _ in range(audio_streams):
            container.add_stream("aac", rate=8000)
        picture = np.zeros((height, width, 3), dtype=np.uint8)
        for pts in stamps:
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_a_48_hour_duration_is_refused(tmp_path: Path) -> None:
    # Two tiny frames 48 hours apart: a few kilobytes that declare two days of video.
    path = _video(tmp_path / "long.mkv", 64, 64, [0, 48 * 3600], Fraction(1, 1))
    assert path.stat().st_size < 100_000
    with pytest.raises(MediaTooLarge, match="VIDEOQA_MAX_VIDEO_SECONDS"):
        probe(path, DEFAULTS)


def test_a_huge_resolution_is_refused(tmp_path: Path) -> None:
    path = _video(tmp_path / "huge.mkv", 4096, 4096, [0], Fraction(1, 1))
    with pytest.raises(MediaTooLarge, match="VIDEOQA_MAX_VIDEO_PIXELS"):
        probe(path, DEFAULTS)


def test_hundreds_of_streams_are_refused(tmp_path: Path) -> None:
    path = _video(tmp_path / "streams.mkv", 64, 64, [0, 1], Fraction(1, 1), audio_streams=200)
    with pytest.raises(MediaTooLarge, match="VIDEOQA_MAX_STREAMS"):
        probe(path, DEFAULTS)
