"""Claiming more generate messages for a batch, against the real Redis broker: claimed messages
stay unacknowledged until settled, and go back to the queue when a batch ends without settling
them."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from pathlib import Path

import redis
from kombu import Connection

from common.celery_config import GENERATE_TASK, GPU_QUEUE, INGEST_TASK, make_celery
from common.errors import StorageUnavailable
from common.settings import Settings
from tests.test_hostile_input import _TouchOnUnpickle
from worker.gpu.claims import GpuQueue


def _queued_job_ids(client: redis.Redis) -> list[str]:
    """Job ids in the gpu queue, in the order a consumer takes them."""
    bodies = [json.loads(raw) for raw in reversed(client.lrange(GPU_QUEUE, 0, -1))]
    return [json.loads(base64.b64decode(body["body"]))[0][0] for body in bodies]


def _setup(settings: Settings, job_ids: list[str]) -> tuple[GpuQueue, redis.Redis]:
    app = make_celery(settings)
    for job_id in job_ids:
        app.send_task(GENERATE_TASK, args=[job_id])
    return GpuQueue(app, hostname="gpu0@test", max_retries=2), redis.Redis.from_url(
        settings.redis_url, decode_responses=True
    )


def test_claims_stay_unacknowledged_until_done(local_settings: Settings) -> None:
    queue, client = _setup(local_settings, ["a", "b", "c"])
    with queue.claim(2, wait_s=0.0) as claims:
        assert [claim.job_id for claim in claims] == ["a", "b"]
        assert client.hlen("unacked") == 2  # restored by the broker if this process died now
        for claim in claims:
            queue.done(claim)
    assert client.hlen("unacked") == 0
    assert _queued_job_ids(client) == ["c"]


def test_claims_left_unsettled_go_back_to_the_head_of_the_queue(local_settings: Settings) -> None:
    queue, client = _setup(local_settings, ["a", "b", "c"])
    try:
        with queue.claim(2, wait_s=0.0) as claims:
            queue.done(claims[0])
            raise KeyboardInterrupt  # a shutdown in the middle of the batch
    except KeyboardInterrupt:
        pass
    assert client.hlen("unacked") == 0
    assert _queued_job_ids(client) == ["b", "c"]


def test_the_leaders_own_job_and_duplicates_are_not_claimed_twice(local_settings: Settings) -> None:
    queue, client = _setup(local_settings, ["lead", "a", "a", "b"])
    with queue.claim(5, wait_s=0.0, exclude="lead") as claims:
        assert [claim.job_id for claim in claims] == ["a", "b"]
        for claim in claims:
            queue.done(claim)
    assert client.llen(GPU_QUEUE) == 0 and client.hlen("unacked") == 0


def test_messages_not_to_run_now_stay_in_the_queue(local_settings: Settings) -> None:
    app = make_celery(local_settings)
    app.send_task(GENERATE_TASK, args=["later"], countdown=600, queue=GPU_QUEUE)
    app.send_task(INGEST_TASK, args=["other"], queue=GPU_QUEUE)
    queue = GpuQueue(app, hostname="gpu0@test", max_retries=2)
    client = redis.Redis.from_url(local_settings.redis_url, decode_responses=True)
    with queue.claim(4, wait_s=0.0) as claims:
        assert claims == []
    with queue.claim(4, wait_s=0.0) as claims:
        assert claims == []
    assert client.llen(GPU_QUEUE) == 2 and client.hlen("unacked") == 0


def test_a_transient_error_sends_the_job_again_until_its_retries_are_spent(local_settings: Settings) -> None:
    queue, client = _setup(local_settings, ["a"])
    given_up: list[str] = []
    for attempt in range(3):
        with queue.claim(1, wait_s=0.0) as claims:
            (claim,) = claims
            assert claim.retries == attempt
            # The retry carries an ETA (backoff); claim it anyway, as a worker would once it is due.
            queue.retry(claim, StorageUnavailable("down"), on_give_up=lambda c, e: given_up.append(c.job_id))
        if attempt < 2:
            raw = json.loads(client.lindex(GPU_QUEUE, 0))
            raw["headers"]["eta"] = None
            client.lset(GPU_QUEUE, 0, json.dumps(raw))
    assert given_up == ["a"]
    assert client.llen(GPU_QUEUE) == 0 and client.hlen("unacked") == 0


def publish_malformed(redis_url: str, marker: Path) -> list[str]:
    """Generate messages no worker can run, as a hostile or broken client would push them; the
    task ids of those that carry one."""
    ids = [str(uuid.uuid4()) for _ in range(4)]
    headers = {"task": GENERATE_TASK, "lang": "py", "argsrepr": "()", "kwargsrepr": "{}"}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    with Connection(redis_url) as connection:
        producer = connection.Producer(serializer="pickle")
        producer.publish(
            ((_TouchOnUnpickle(marker),), {}, embed), routing_key=GPU_QUEUE, headers={**headers, "id": ids[0]}
        )
        producer.publish(
            b"{not json", routing_key=GPU_QUEUE, content_type="application/json", content_encoding="utf-8",
            headers={**headers, "id": ids[1]},
        )  # fmt: skip
        producer = connection.Producer(serializer="json")
        producer.publish(([], {}, embed), routing_key=GPU_QUEUE, headers={**headers, "id": ids[2]})
        producer.publish(
            ([{"job": 1}, "x"], {"more": 1}, embed), routing_key=GPU_QUEUE, headers={**headers, "id": ids[3]}
        )
    # And bytes that are not even a message envelope.
    redis.Redis.from_url(redis_url).lpush(GPU_QUEUE, b"\x80garbage")
    return ids


def test_malformed_messages_are_removed_once_and_never_unpickled(
    local_settings: Settings, tmp_path: Path, caplog
) -> None:
    marker = tmp_path / "unpickled"
    queue, client = _setup(local_settings, ["a"])
    publish_malformed(local_settings.redis_url, marker)
    make_celery(local_settings).send_task(GENERATE_TASK, args=["b"])
    make_celery(local_settings).send_task(GENERATE_TASK, kwargs={"job_id": "c"})  # by name: also the task's call
    with caplog.at_level(logging.ERROR, logger="worker.gpu.claims"), queue.claim(4, wait_s=0.0) as claims:
        assert [claim.job_id for claim in claims] == ["a", "b", "c"]
        for claim in claims:
            queue.done(claim)
    assert client.llen(GPU_QUEUE) == 0 and client.hlen("unacked") == 0
    assert not marker.exists()
    removed = [record.getMessage() for record in caplog.records if "malformed message" in record.getMessage()]
    assert len(removed) == 5, removed
    assert "ContentDisallowed" in removed[0] and "DecodeError" in removed[1] and "not one job id" in removed[2]
