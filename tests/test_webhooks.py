"""Signed webhooks through the running service: a loopback receiver (allowlisted, as the
service's media servers are) gets the job's record signed the Standard Webhooks way, a failed
delivery is retried, and no hop of a delivery reaches an address the policy refuses."""

from __future__ import annotations

import http.server
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from standardwebhooks import Webhook

from api.app import create_app
from common.errors import FetchFailed
from common.jobs import JobStore
from common.settings import Settings
from common.url_policy import UrlPolicy
from tests.conftest import WEBHOOK_SECRET, RunningService
from tests.test_openapi import _conforms
from worker.cpu import safe_http

TIMEOUT_S = 180.0


class _Receiver(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server: Any = self.server
        answers: list[tuple[int, str | None]] = server.answers
        status, location = answers.pop(0) if answers else (204, None)
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        server.received.put((self.path, {k.lower(): v for k, v in self.headers.items()}, body.decode()))


def _serve(address: str) -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer((address, 0), _Receiver)
    server.answers = []
    server.received = queue.Queue()
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture()
def receiver() -> Iterator[Any]:
    """Plays the user's endpoint: 127.0.0.1 is allowlisted in the test service."""
    yield from _serve("127.0.0.1")


@pytest.fixture()
def internal() -> Iterator[Any]:
    """Plays an internal service: 127.0.0.3 is not allowlisted."""
    yield from _serve("127.0.0.3")


def _url(server: Any, path: str = "/hook") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def _upload(service: RunningService, video: Path, **fields: str) -> str:
    return service.upload(video, question="What is shown?", num_frames="2", max_new_tokens="4", **fields)


def _webhook_state(service: RunningService, job_id: str, done: Any) -> dict[str, Any]:
    """The job's record once ``done(record["webhook"])`` holds."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = requests.get(service.url(f"/v1/jobs/{job_id}"), timeout=10).json()
        if job["webhook"] is not None and done(job["webhook"]):
            return dict(job)
        time.sleep(0.2)
    raise AssertionError(f"webhook of {job_id} not settled: {job}\n{service.tail_logs()}")


def test_a_delivery_follows_redirects_with_the_same_post(receiver: Any) -> None:
    # The sender alone, against two loopback endpoints: the first moves the hook to the second.
    for _ in range(2):
        receiver.answers.append((308, _url(receiver, "/moved")))
    policy = UrlPolicy.from_allowlist(["127.0.0.1"])
    status = safe_http.post(
        _url(receiver), b'{"a": 1}', {"Content-Type": "application/json"}, policy=policy, timeout_s=10
    )
    assert status == 204
    hops = [receiver.received.get(timeout=10) for _ in range(3)]
    assert [path for path, _, _ in hops] == ["/hook", "/moved", "/moved"]
    assert {body for _, _, body in hops} == {'{"a": 1}'}
    receiver.answers.extend([(302, _url(receiver))] * 4)
    with pytest.raises(FetchFailed, match="redirects more than 3 times"):
        safe_http.post(_url(receiver), b"{}", {}, policy=policy, timeout_s=10)


def test_webhook_is_signed_retried_after_a_500_and_recorded(
    service: RunningService, sample_videos: list[Path], receiver: Any
) -> None:
    receiver.answers.append((500, None))
    job_id = _upload(service, sample_videos[0], webhook_url=_url(receiver))
    assert requests.get(service.url(f"/v1/jobs/{job_id}"), timeout=10).json()["webhook"] == {
        "attempts": 0, "last_status": None, "last_error": None, "delivered_at": None
    }  # fmt: skip
    deliveries = [receiver.received.get(timeout=TIMEOUT_S) for _ in range(2)]

    final = service.wait(job_id)
    assert final["status"] == "succeeded"
    verifier = Webhook(WEBHOOK_SECRET)
    for path, headers, body in deliveries:
        assert path == "/hook"
        assert headers["content-type"] == "application/json"
        record = verifier.verify(body, headers)  # raises unless signed with the service's key
        assert record["id"] == job_id
        assert record["status"] == "succeeded"
        assert record["result"]["answer"] == final["result"]["answer"]
        assert record["links"] == final["links"]
    # The same message on each attempt: a receiver deduplicates by its id.
    assert deliveries[0][1]["webhook-id"] == deliveries[1][1]["webhook-id"]

    job = _webhook_state(service, job_id, lambda hook: hook["delivered_at"] is not None)
    assert job["webhook"]["attempts"] == 2
    assert job["webhook"]["last_status"] == 204
    assert job["webhook"]["last_error"] is None
    _conforms(requests.get(service.url("/openapi.json"), timeout=10).json(), "JobView", job)
    # Recording the attempts kept the record's expiry.
    client = redis.Redis.from_url(service.settings.redis_url)
    assert 0 < client.ttl(JobStore.key(job_id)) <= service.settings.job_ttl_s


def test_only_the_events_asked_for_are_delivered(
    service: RunningService, sample_videos: list[Path], receiver: Any
) -> None:
    skipped = _upload(service, sample_videos[0], webhook_url=_url(receiver, "/skipped"), webhook_events="failed")
    assert service.wait(skipped)["status"] == "succeeded"
    delivered = _upload(
        service, sample_videos[0], webhook_url=_url(receiver, "/delivered"), webhook_events="succeeded,failed"
    )
    # One CPU worker takes its queue in order: the first job's delivery task ran before the
    # second job was even ingested.
    path, headers, body = receiver.received.get(timeout=TIMEOUT_S)
    assert path == "/delivered"
    assert Webhook(WEBHOOK_SECRET).verify(body, headers)["id"] == delivered
    assert requests.get(service.url(f"/v1/jobs/{skipped}"), timeout=10).json()["webhook"]["attempts"] == 0
    assert receiver.received.empty()


def test_webhook_to_a_private_address_is_refused_at_submission(service: RunningService) -> None:
    private = ("http://127.0.0.3:8080/hook", "http://169.254.169.254/latest", "http://[::1]/hook", "ftp://example.com/")
    for url in private:
        response = requests.post(
            service.url("/v1/jobs"),
            json={"question": "What?", "videos": [{"url": "http://127.0.0.1:9/a.mp4"}], "webhook": {"url": url}},
            timeout=30,
        )
        assert response.status_code == 400, (url, response.text)
        assert [d["field"] for d in response.json()["error"]["details"]] == ["webhook.url"], url


def test_a_redirect_to_a_private_address_is_not_followed_at_delivery(
    service: RunningService, sample_videos: list[Path], receiver: Any, internal: Any
) -> None:
    receiver.answers.append((307, _url(internal)))
    job_id = _upload(service, sample_videos[0], webhook_url=_url(receiver))
    receiver.received.get(timeout=TIMEOUT_S)  # the first hop, which redirects

    job = _webhook_state(service, job_id, lambda hook: hook["last_error"] is not None)
    assert "non-public address" in job["webhook"]["last_error"]
    assert job["webhook"]["delivered_at"] is None
    assert job["webhook"]["attempts"] == 1
    assert internal.received.empty()


def test_a_cancelled_job_is_delivered_as_cancelled(service: RunningService, receiver: Any) -> None:
    # A video nobody serves: the job stays in ingest long enough to be cancelled by the API.
    created = requests.post(
        service.url("/v1/jobs"),
        json={
            "question": "What?",
            "videos": [{"url": "http://127.0.0.1:9/never.mp4"}],
            "webhook": {"url": _url(receiver), "events": ["cancelled"]},
        },
        timeout=30,
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    cancelled = requests.delete(service.url(f"/v1/jobs/{job_id}"), timeout=10)
    if cancelled.status_code == 409:
        pytest.skip("the job failed before it could be cancelled")
    _, headers, body = receiver.received.get(timeout=TIMEOUT_S)
    record = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert (record["id"], record["status"]) == (job_id, "cancelled")


@pytest.fixture()
def app_without_secret(local_settings: Settings) -> Flask:
    assert local_settings.webhook_secret is None
    return create_app(local_settings)


def test_webhooks_are_refused_when_the_service_has_no_signing_key(app_without_secret: Flask) -> None:
    response = app_without_secret.test_client().post(
        "/v1/jobs",
        json={
            "question": "What?",
            "videos": [{"url": "https://93.184.215.14/a.mp4"}],
            "webhook": {"url": "https://93.184.215.14/hook"},
        },
    )
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["details"] == [
        {"field": "webhook", "message": "webhooks are off: this service has no VIDEOQA_WEBHOOK_SECRET to sign them"}
    ]
