"""Hostile bytes on the wire: pickle pushed into the queue, oversized and chunked bodies."""

from __future__ import annotations

import http.client
import io
import json
import pathlib
import time
import uuid
from pathlib import Path

import requests
from kombu import Connection

from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from tests.conftest import RunningService


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a pickle payload was deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_message_is_refused_not_run(
    service: RunningService, tmp_path: Path, sample_videos: list[Path]
) -> None:
    jobs = JobStore(redis_client(service.settings), ttl_s=600)
    job = jobs.create({"question": "q", "prompt": None, "videos": [], "images": [], "sampling": {}, "generation": {}})
    marker = tmp_path / "unpickled"
    with Connection(service.settings.redis_url) as connection:
        producer = connection.Producer(serializer="pickle")
        producer.publish(
            (
                (job.id, _TouchOnUnpickle(marker)),
                {},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
            ),
            routing_key="cpu",
            headers={
                "task": "videoqa.ingest",
                "id": str(uuid.uuid4()),
                "lang": "py",
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
        )
    # The worker keeps serving: a normal job sent after the pickle one completes.
    job_id = service.upload(sample_videos[0], question="still there?", num_frames="2", max_new_tokens="3")
    assert service.wait(job_id)["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while "untrusted content" not in (service.logs / "cpu.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "untrusted content" in (service.logs / "cpu.log").read_text()
    assert not marker.exists()
    stored = jobs.get(job.id)
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.attempts == 0


def test_upload_over_the_limit_is_413_before_the_body_is_read(service: RunningService) -> None:
    """The service runs with the default 2 GiB cap: a declared length above it is refused at once."""
    limit = service.settings.max_upload_bytes
    host, port = service.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/v1/jobs")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(limit + 1))
    connection.endheaders()
    connection.send(b"--x\r\n")  # a few bytes of the announced 2 GiB, and no more
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_entity_too_large"
    connection.close()


def test_chunked_upload_over_the_limit_is_413(spare_redis_url: str, tmp_path: Path) -> None:
    from worker.cli.stack import Stack, api_command, free_port, wait_for_http

    port = free_port()
    env = {
        "VIDEOQA_REDIS_URL": spare_redis_url,
        "VIDEOQA_STORAGE_URL": str(tmp_path / "s"),
        "VIDEOQA_MAX_UPLOAD_BYTES": "100000",
    }
    stack = Stack(env=env, logs=tmp_path)
    stack.start("api", api_command(port=port, workers=1))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz")

        def chunks():
            yield b'--x\r\nContent-Disposition: form-data; name="videos"; filename="a.mp4"\r\n\r\n'
            for _ in range(50):
                yield b"z" * 10_000
            yield b"\r\n--x--\r\n"

        response = requests.post(
            f"{base}/v1/jobs", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=30
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_entity_too_large"

        parts = {"question": "q"} | {f"field{n}": "x" for n in range(200)}
        response = requests.post(f"{base}/v1/jobs", files={k: (None, v) for k, v in parts.items()}, timeout=30)
        assert response.status_code == 413
        assert not any((tmp_path / "s").rglob("*.mp4"))
    finally:
        stack.stop()


def test_not_a_video_zero_bytes_and_truncated_uploads(service: RunningService, sample_videos: list[Path]) -> None:
    whole = sample_videos[0].read_bytes()
    cases = {
        "truncated.mp4": whole[: len(whole) // 3],
        "playlist.mp4": b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/x.ts\n",
    }
    ids = {}
    for name, content in cases.items():
        response = requests.post(
            service.url("/v1/jobs"),
            files=[("videos", (name, io.BytesIO(content), "video/mp4"))],
            data={"question": "q"},
            timeout=30,
        )
        ids[name] = response.json()["id"]
    for name, job_id in ids.items():
        job = service.wait(job_id)
        assert job["status"] == "failed", name
        assert job["error"]["code"] == "invalid_media", (name, job["error"])
    empty = requests.post(
        service.url("/v1/jobs"),
        files=[("videos", ("e.mp4", io.BytesIO(b""), "video/mp4"))],
        data={"question": "q"},
        timeout=30,
    )
    assert empty.status_code == 400
