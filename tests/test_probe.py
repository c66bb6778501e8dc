"""Probing before decoding: what is not a video is refused, and so is what is over a limit,
with the limit named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from common.errors import InvalidMedia, MediaTooLarge
from common.settings import load_settings
from worker.fixtures.synthetic_videos import write_cat_video
from worker.media.probe import MediaLimits, probe

LIMITS = MediaLimits.from_settings(load_settings({}))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cat_video(tmp_path_factory.mktemp("probe") / "clip.mp4", seconds=2, fps=30, width=160, height=120,
                           audio=True)  # fmt: skip


def test_probe_describes_a_video(clip: Path) -> None:
    info = probe(clip, LIMITS)
    assert (info.width, info.height, info.codec, info.streams) == (160, 120, "h264", 2)
    assert info.declared_frames == 60
    assert info.declared_seconds == pytest.approx(2.0, abs=0.05)
    assert info.bytes == clip.stat().st_size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_seconds": 1.5}, r"lasts 2\.0 s; the limit is 1\.5 s \(VIDEOQA_MAX_VIDEO_SECONDS\)"),
        ({"max_pixels": 16000}, r"160x120 \(19200 pixels\); the limit is 16000 pixels \(VIDEOQA_MAX_VIDEO_PIXELS\)"),
        ({"max_frames": 59}, r"60 frames; the limit is 59 \(VIDEOQA_MAX_VIDEO_FRAMES\)"),
        ({"max_streams": 1}, r"2 streams; the limit is 1 \(VIDEOQA_MAX_STREAMS\)"),
        ({"max_bytes": 1000}, r"bytes; the limit is 1000 \(VIDEOQA_MAX_DOWNLOAD_BYTES\)"),
    ],
)
def test_a_file_over_a_limit_is_refused_naming_it(clip: Path, change: dict[str, float], message: str) -> None:
    with pytest.raises(MediaTooLarge, match=message) as raised:
        probe(clip, dataclasses.replace(LIMITS, **change))
    assert raised.value.code == "media_too_large"


def test_an_image_is_not_a_video(tmp_path: Path) -> None:
    for name in ("still.png", "still.jpg"):
        Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / name)
        with pytest.raises(InvalidMedia, match="an image, not a video"):
            probe(tmp_path / name, LIMITS)


def test_an_audio_only_file_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidMedia, match="no video stream"):
        probe(path, LIMITS)


def test_demuxers_that_follow_references_are_refused(tmp_path: Path, clip: Path) -> None:
    """A playlist or a concat list naming a real local video is not opened at all."""
    (tmp_path / "clip.mp4").write_bytes(clip.read_bytes())
    playlists = {
        "list.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nclip.mp4\n#EXT-X-ENDLIST\n",
        "list.ffconcat": "ffconcat version 1.0\nfile clip.mp4\n",
        "list.txt": "ffconcat version 1.0\nfile clip.mp4\n",
    }
    for name, text in playlists.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidMedia, match="not a readable media file"):
            probe(tmp_path / name, LIMITS)
    # The same bytes without the restriction would have been followed: the refusal is the point.
    with av.open(str(tmp_path / "list.m3u8"), options={"protocol_whitelist": "file"}) as container:
        assert container.format.name == "hls"


def test_other_bytes_are_invalid_media(tmp_path: Path, clip: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(clip.read_bytes()[:300])
    for path in (text, empty, truncated):
        with pytest.raises(InvalidMedia):
            probe(path, LIMITS)
