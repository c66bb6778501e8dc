"""Still images decoded in children of the real fork server, with a pixel limit read from the
header: bombs fail ``media_too_large`` before a pixel is decoded, normal images keep their pixels."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from common.errors import InvalidMedia, MediaTooLarge
from common.settings import load_settings
from tests.conftest import BUCKET, RunningService
from worker.app.resources import load_geometry
from worker.media.geometry import FrameGeometry
from worker.media.still_image import decode_image

# Images are decoded in the sandbox's own server process.
pytestmark = pytest.mark.service

GEOMETRY = FrameGeometry(96, 64, Image.Resampling.BICUBIC)


def _png_bomb(path: Path, side: int = 50_000) -> Path:
    """A valid 1-bit PNG of side x side pixels, all black: a few hundred KB on disk, 2.5 G pixels
    (7.5 GB as RGB) once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte, then the row's bits
    rows = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack("!IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _gif_bomb(path: Path, side: int = 50_000) -> Path:
    """A one-pixel GIF whose screen and picture say side x side: a few dozen bytes."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", side, side)  # the logical screen
    palette = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0
    picture = data.index(b",", 13 + palette)  # the image descriptor: left, top, width, height
    data[picture + 5 : picture + 9] = struct.pack("<HH", side, side)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [_png_bomb, _gif_bomb])
def test_an_image_bomb_fails_media_too_large_before_it_is_decoded(tmp_path: Path, make) -> None:
    bomb = make(tmp_path / "bomb")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(MediaTooLarge, match=r"50000x50000 \(2500000000 pixels\); the limit is 67108864 pixels "
                                            r"\(VIDEOQA_MAX_IMAGE_PIXELS\)"):  # fmt: skip
        decode_image(bomb, GEOMETRY, load_settings({}))
    # The limit is the setting's.
    with pytest.raises(MediaTooLarge, match="the limit is 1000 pixels"):
        small = _picture(tmp_path / "small.png", "RGB")
        decode_image(small, GEOMETRY, load_settings({"VIDEOQA_MAX_IMAGE_PIXELS": "1000"}))


def _picture(path: Path, mode: str) -> Path:
    rng = np.random.default_rng(len(mode))
    image = Image.fromarray(rng.integers(0, 256, (150, 200, 4), dtype=np.uint8), "RGBA").convert(mode)
    image.save(path)
    return path


@pytest.mark.parametrize(("name", "mode"), [("a.png", "RGBA"), ("b.jpg", "RGB"), ("c.gif", "P"), ("d.png", "L"),
                                            ("e.webp", "RGB"), ("f.bmp", "RGB")])  # fmt: skip
def test_images_decoded_in_the_sandbox_have_the_pixels_of_in_process_decoding(
    tmp_path: Path, name: str, mode: str
) -> None:
    path = _picture(tmp_path / name, mode)
    with Image.open(path) as image:
        expected = GEOMETRY.resize(image.convert("RGB"))
    got = decode_image(path, GEOMETRY, load_settings({}))
    assert got.mode == "RGB" and got.size == (96, 64)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_file_that_is_not_an_image_fails_invalid_media(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("not an image")
    with pytest.raises(InvalidMedia, match="not a readable image"):
        decode_image(path, GEOMETRY, load_settings({}))


# --- through the service --------------------------------------------------------------------------


def _submit(service: RunningService, video: Path, image: tuple[str, bytes]) -> str:
    with open(video, "rb") as handle:
        response = requests.post(
            service.url("/v1/jobs"),
            files=[
                ("videos", (video.name, handle, "video/mp4")),
                ("images", (image[0], io.BytesIO(image[1]), "image/png")),
            ],
            data={"question": "What is shown?", "num_frames": "2", "max_new_tokens": "3"},
            timeout=30,
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_an_image_bomb_fails_its_job_and_a_normal_image_is_stored_as_decoded(
    service: RunningService, s3: Any, sample_videos: list[Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    bomb = _submit(service, sample_videos[0], ("bomb.png", _png_bomb(tmp_path / "bomb.png").read_bytes()))
    picture = _picture(tmp_path / "cat.png", "RGB").read_bytes()
    normal = _submit(service, sample_videos[0], ("cat.png", picture))
    failed = service.wait(bomb)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "media_too_large"
    assert "VIDEOQA_MAX_IMAGE_PIXELS" in failed["error"]["message"]
    assert service.wait(normal)["status"] == "succeeded"
    # The worker said at start what confines its decode children.
    assert "decode sandbox: seccomp filter on" in (service.logs / "cpu.log").read_text()
    geometry = load_geometry(str(tiny_model_dir))
    # Where it lies depends on the tenant's scope and the retention period: find it by content.
    wanted = f"images/{hashlib.sha256(picture).hexdigest()}/{geometry.key()}"
    listed = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="service/")
    (key,) = [item["Key"] for page in listed for item in page.get("Contents", []) if wanted in item["Key"]]
    stored = Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))
    with Image.open(io.BytesIO(picture)) as image:
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(geometry.resize(image.convert("RGB"))))
