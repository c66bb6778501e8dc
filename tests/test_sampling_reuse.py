"""The CPU stage on real Redis, a local store and a real HTTP server: a second job of the same
tenant on the same bytes (or the same URL with the same ETag) reuses the stored frames while they
are young enough, another tenant does not unless frames are shared, and a video that cannot be
sampled fails its job with the right code while the next job still goes through."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.connections import redis_client
from common.jobs import Job, JobStatus, JobStore
from common.schemas import MediaSource, Sampling, StoredRequest
from common.settings import Settings, load_settings
from common.storage import LocalStore
from worker.cpu.stage import IngestContext, ingest_job
from worker.fixtures.synthetic_videos import write_cat_video
from worker.media.geometry import FrameGeometry


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``body``; ``sent`` lists the statuses it answered with."""

    body: bytes
    sent: list[int]


class _VideoServer(http.server.BaseHTTPRequestHandler):
    """Serves one file with a strong ETag and honours If-None-Match, counting what it sent."""

    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body: bytes = self.server.body
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == etag:
            self.server.sent.append(304)
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.server.sent.append(200)
        self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _VideoServer)
    httpd.sent = []
    httpd.body = b""
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def settings(spare_redis_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        {
            "VIDEOQA_REDIS_URL": spare_redis_url,
            "VIDEOQA_STORAGE_URL": str(tmp_path / "store"),
            "VIDEOQA_FETCH_ALLOWLIST": "127.0.0.1",
            # Small frames: enough for a 160x120 video, not for a 4K decoder.
            "VIDEOQA_DECODE_MEMORY_MB": "220",
        }
    )


@pytest.fixture()
def context(settings: Settings) -> IngestContext:
    return IngestContext(
        settings=settings,
        jobs=JobStore(redis_client(settings), ttl_s=settings.job_ttl_s),
        store=LocalStore(Path(settings.storage_url)),
        geometry=lambda: FrameGeometry(64, 64, 3),
        enqueue_answer=lambda job_id: None,
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cat_video(tmp_path_factory.mktemp("reuse") / "cat.mp4", seconds=3, fps=30, width=160, height=120)


def _run_job(ctx: IngestContext, source: MediaSource, tenant: str = "public", **sampling: Any) -> Job:
    request = StoredRequest(
        question="q", prompt=None, videos=[source], images=[], sampling=Sampling(**sampling), generation={}
    )
    job = ctx.jobs.create(request.model_dump(mode="json"), tenant=tenant)
    ingest_job(job.id, ctx)
    done = ctx.jobs.get(job.id)
    assert done is not None
    return done


def _upload(ctx: IngestContext, path: Path, name: str) -> MediaSource:
    ctx.store.put_file(f"uploads/{name}", path)
    return MediaSource(kind="upload", location=f"uploads/{name}")


def test_a_second_job_on_the_same_bytes_does_not_decode_again(context: IngestContext, video: Path) -> None:
    first = _run_job(context, _upload(context, video, "a.mp4"), num_frames=4)
    # Other upload, same bytes: the content hash finds the frames.
    second = _run_job(context, _upload(context, video, "b.mp4"), num_frames=4)
    assert first.status is JobStatus.QUEUED_GPU and second.status is JobStatus.QUEUED_GPU
    assert "decode" in first.ingest_timings
    assert "decode" not in second.ingest_timings and "store_frames" not in second.ingest_timings
    assert second.media == first.media
    assert [f["index"] for f in first.media[0]["frames"]] == [0, 22, 44, 66]
    # Other parameters are other frames.
    third = _run_job(context, _upload(context, video, "c.mp4"), num_frames=3)
    assert "decode" in third.ingest_timings


def test_the_same_url_with_the_same_etag_is_neither_downloaded_nor_decoded(
    context: IngestContext, server: _Server, video: Path, tmp_path: Path
) -> None:
    server.body = video.read_bytes()
    source = MediaSource.from_url(f"http://127.0.0.1:{server.server_address[1]}/cat.mp4")
    first = _run_job(context, source, num_frames=4)
    second = _run_job(context, source, num_frames=4)
    assert server.sent == [200, 304]
    assert "decode" in first.ingest_timings and "decode" not in second.ingest_timings
    assert second.media == first.media

    # New bytes behind the same URL: a new ETag, so a full download and new frames.
    server.body = write_cat_video(tmp_path / "other.mp4", seconds=2, fps=30, width=160, height=120,
                                  variant=1).read_bytes()  # fmt: skip
    third = _run_job(context, source, num_frames=4)
    assert server.sent == [200, 304, 200]
    assert "decode" in third.ingest_timings
    assert third.media != first.media


def test_frames_older_than_half_the_retention_are_sampled_again(context: IngestContext, video: Path) -> None:
    first = _run_job(context, _upload(context, video, "a.mp4"), num_frames=4)
    # Older than half the retention, they could expire before this job's record names them.
    past = time.time() - context.settings.storage_retention_s / 2 - 60
    for path in Path(context.settings.storage_url).rglob("*.*"):
        os.utime(path, (past, past))
    second = _run_job(context, _upload(context, video, "b.mp4"), num_frames=4)
    assert "decode" in first.ingest_timings and "decode" in second.ingest_timings
    assert second.status is JobStatus.QUEUED_GPU


def test_tenants_share_neither_frames_nor_etag_records_unless_told_to(
    context: IngestContext, server: _Server, video: Path
) -> None:
    acme = _run_job(context, _upload(context, video, "a.mp4"), tenant="acme", num_frames=4)
    beta = _run_job(context, _upload(context, video, "b.mp4"), tenant="beta", num_frames=4)
    # Reused frames would tell beta, through its timings, that someone sent these bytes before.
    assert "decode" in acme.ingest_timings and "decode" in beta.ingest_timings
    assert all(f["key"].startswith("tenants/acme/frames/") for f in acme.media[0]["frames"])
    assert all(f["key"].startswith("tenants/beta/frames/") for f in beta.media[0]["frames"])

    server.body = video.read_bytes()
    url = MediaSource.from_url(f"http://127.0.0.1:{server.server_address[1]}/cat.mp4")
    _run_job(context, url, tenant="acme", num_frames=4)
    _run_job(context, url, tenant="beta", num_frames=4)
    _run_job(context, url, tenant="beta", num_frames=4)
    assert server.sent == [200, 200, 304]

    shared = replace(context, settings=context.settings.model_copy(update={"share_frames_across_tenants": True}))
    first = _run_job(shared, _upload(context, video, "c.mp4"), tenant="acme", num_frames=4)
    second = _run_job(shared, _upload(context, video, "d.mp4"), tenant="beta", num_frames=4)
    assert "decode" in first.ingest_timings and "decode" not in second.ingest_timings
    assert second.media == first.media


def test_a_window_outside_the_video_fails_the_job_as_a_bad_request(context: IngestContext, video: Path) -> None:
    job = _run_job(context, _upload(context, video, "a.mp4"), num_frames=4, start=5.0, end=8.0)
    assert job.status is JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "invalid_request"
    assert "holds no frames" in job.error["message"]


def test_an_undecodable_video_fails_its_job_and_the_next_job_goes_through(
    context: IngestContext, video: Path, tmp_path: Path
) -> None:
    big = write_cat_video(tmp_path / "uhd.mp4", seconds=0.2, fps=30, width=3840, height=2160)
    failed = _run_job(context, _upload(context, big, "uhd.mp4"), num_frames=2)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error["code"] == "invalid_media"
    image = tmp_path / "still.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    not_video = _run_job(context, _upload(context, image, "still.png"), num_frames=2)
    assert not_video.error is not None and not_video.error["code"] == "invalid_media"
    ok = _run_job(context, _upload(context, video, "a.mp4"), num_frames=2)
    assert ok.status is JobStatus.QUEUED_GPU


def test_fast_mode_frames_carry_their_distance_to_the_target(context: IngestContext, tmp_path: Path) -> None:
    path = write_cat_video(tmp_path / "gop.mp4", seconds=4, fps=30, width=160, height=120, gop=40)
    job = _run_job(context, _upload(context, path, "gop.mp4"), num_frames=4, fast=True)
    frames = job.media[0]["frames"]
    assert [f["index"] for f in frames] == [0, 40, 80]
    assert [f["offset"] for f in frames] == pytest.approx([0.0, 10 / 30, -10 / 30])
