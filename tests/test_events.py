"""A job's live events (Server-Sent Events) and waiting for a job in one request, through the
running service: gunicorn, a CPU worker and a GPU worker over Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from common.api_keys import hash_key
from tests.conftest import RunningService, service_env, start_service
from worker.cli.stack import wait_for_http

LIFECYCLE = ["queued", "ingesting", "queued_gpu", "generating", "succeeded"]


@dataclass
class Event:
    id: str
    kind: str
    data: Any


def read_events(
    service: RunningService, job_id: str, *, headers: dict[str, str] | None = None, stop_after: int | None = None
) -> list[Event]:
    """The stream's events until it ends (or the first ``stop_after`` of them, then hang up)."""
    events: list[Event] = []
    with requests.get(
        service.url(f"/v1/jobs/{job_id}/events"), headers=headers or {}, stream=True, timeout=(10, 300)
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines(decode_unicode=True):
            assert isinstance(line, str)  # decoded, as asked
            if line.startswith(":"):
                continue  # a heartbeat
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                events.append(Event(fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
                if stop_after is not None and len(events) == stop_after:
                    break
    return events


def _statuses(events: list[Event]) -> list[str]:
    return [event.data["status"] for event in events if event.kind == "status"]


def _answer(events: list[Event]) -> str:
    return "".join(event.data["text"] for event in events if event.kind == "token")


def test_events_come_in_lifecycle_order_with_tokens_and_end_with_done(
    service: RunningService, sample_videos: list[Path]
) -> None:
    job_id = service.upload(sample_videos[0], question="What happens?", num_frames="2", max_new_tokens="12")
    events = read_events(service, job_id)
    kinds = [event.kind for event in events]
    assert _statuses(events) == LIFECYCLE, (kinds, service.tail_logs())
    assert kinds[-1] == "done" and kinds.count("done") == 1
    done = events[-1].data
    assert done["status"] == "succeeded" and done["id"] == job_id
    # Tokens come while the job generates, before its last status.
    position = {event.data["status"]: i for i, event in enumerate(events) if event.kind == "status"}
    tokens = [i for i, kind in enumerate(kinds) if kind == "token"]
    assert tokens and position["generating"] < min(tokens) and max(tokens) < position["succeeded"]
    assert _answer(events) == done["result"]["answer"]
    assert events[0].data["links"]["self"] == f"/v1/jobs/{job_id}"
    ids = [event.id for event in events]
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_a_client_resuming_with_last_event_id_gets_what_it_missed_and_nothing_twice(
    service: RunningService, sample_videos: list[Path]
) -> None:
    job_id = service.upload(sample_videos[1], question="And this one?", num_frames="2", max_new_tokens="12")
    first = read_events(service, job_id, stop_after=2)  # hangs up while the job runs
    rest = read_events(service, job_id, headers={"Last-Event-ID": first[-1].id})
    everything = read_events(service, job_id)  # the whole history, replayed after the end
    assert [e.id for e in first + rest] == [e.id for e in everything]
    assert [e.kind for e in first + rest] == [e.kind for e in everything]
    # Resuming after the last event of an ended job: nothing more, and the stream ends.
    assert read_events(service, job_id, headers={"Last-Event-ID": everything[-1].id}) == []
    bad = requests.get(service.url(f"/v1/jobs/{job_id}/events"), headers={"Last-Event-ID": "abc"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert requests.get(service.url("/v1/jobs/nope/events"), timeout=10).status_code == 404


def test_prefer_wait_answers_with_the_ended_job(service: RunningService, sample_videos: list[Path]) -> None:
    with open(sample_videos[0], "rb") as handle:
        response = requests.post(
            service.url("/v1/jobs"),
            files=[("videos", (sample_videos[0].name, handle, "video/mp4"))],
            data={"question": "Waiting?", "num_frames": "1", "max_new_tokens": "4"},
            headers={"Prefer": "respond-async, wait=60"},
            timeout=90,
        )
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=60"
    job = response.json()
    assert job["status"] == "succeeded" and job["result"]["answer"] is not None
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    again = requests.get(service.url(f"/v1/jobs/{job['id']}?wait=60"), timeout=90)
    assert again.status_code == 200 and again.json()["status"] == "succeeded"


def test_a_bad_wait_is_refused_and_creates_no_job(service: RunningService) -> None:
    before = requests.get(service.url("/v1/jobs?limit=100"), timeout=10).json()["jobs"]
    body = {"question": "q", "videos": [{"url": "http://127.0.0.1:9/v.mp4"}]}
    for value in ("0", "61", "-1", "soon", "nan", "inf"):
        refused = requests.post(service.url("/v1/jobs"), json=body, headers={"Prefer": f"wait={value}"}, timeout=10)
        assert refused.status_code == 400, (value, refused.text)
        assert refused.json()["error"]["code"] == "invalid_request"
        assert "wait" in refused.json()["error"]["message"]
        assert requests.get(service.url(f"/v1/jobs/any?wait={value}"), timeout=10).status_code == 400
    assert requests.get(service.url("/v1/jobs?limit=100"), timeout=10).json()["jobs"] == before


ALICE, BOB = "vqa_events_alice_key", "vqa_events_bob_key"


@pytest.fixture()
def batching_service(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[RunningService]:
    """Two tenants; the GPU worker waits for three queued jobs, so the three below share a batch
    and the first two cannot end before the third is submitted."""
    env = service_env(
        spare_redis_url, aws_env, tiny_model_dir,
        VIDEOQA_API_KEYS=f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}",
        VIDEOQA_BATCH_SIZE="3", VIDEOQA_BATCH_WAIT_MS="300000", VIDEOQA_EVENTS_HEARTBEAT_S="1",
    )  # fmt: skip
    running = start_service(env, tmp_path)
    try:
        wait_for_http(running.url("/healthz"), timeout_s=60)
        yield running
    finally:
        running.stack.stop()


def _submit(service: RunningService, video: Path, question: str, *, prefer: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {ALICE}", **({"Prefer": prefer} if prefer else {})}
    with open(video, "rb") as handle:
        return requests.post(
            service.url("/v1/jobs"),
            files=[("videos", (video.name, handle, "video/mp4"))],
            data={"question": question, "num_frames": "2", "max_new_tokens": "16"},
            headers=headers,
            timeout=400,
        )


def test_tokens_of_a_batch_concatenate_to_each_answer_and_waits_end_on_time(
    batching_service: RunningService, sample_videos: list[Path]
) -> None:
    service = batching_service
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    first = _submit(service, sample_videos[0], "What moves?")
    assert first.status_code == 202
    first_id = first.json()["id"]
    # Not ended after 1 s (it waits for its batch): the record as it is then.
    waited = requests.get(service.url(f"/v1/jobs/{first_id}?wait=1"), headers=alice, timeout=60)
    assert waited.status_code == 200 and waited.json()["status"] in {"queued", "ingesting", "queued_gpu"}
    second = _submit(service, sample_videos[1], "Which colours?", prefer="wait=1")
    assert second.status_code == 202 and second.headers["Preference-Applied"] == "wait=1"
    assert second.json()["status"] in {"queued", "ingesting", "queued_gpu"}
    # Another tenant's key sees neither the job nor its events.
    assert requests.get(service.url(f"/v1/jobs/{first_id}/events"), headers=bob, timeout=10).status_code == 404
    assert requests.get(service.url(f"/v1/jobs/{first_id}?wait=5"), headers=bob, timeout=10).status_code == 404
    assert requests.get(service.url(f"/v1/jobs/{first_id}/events"), timeout=10).status_code == 401
    third = _submit(service, sample_videos[0], "Is it the same?", prefer="wait=60")
    assert third.status_code in (200, 202) and third.headers["Preference-Applied"] == "wait=60"
    ids = [first_id, second.json()["id"], third.json()["id"]]
    for job_id in ids:
        events = read_events(service, job_id, headers=alice)
        done = events[-1]
        assert done.kind == "done" and done.data["status"] == "succeeded", (events[-1], service.tail_logs())
        assert done.data["result"]["batch_size"] == 3
        assert _statuses(events) == LIFECYCLE
        assert _answer(events) == done.data["result"]["answer"]
        assert [e.kind for e in events].count("token") >= 1
