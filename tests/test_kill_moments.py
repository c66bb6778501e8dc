"""A CPU worker killed at the unlucky moments of a task's life: the job still ends, once, through
the broker's own redelivery (the reconciler is kept out of reach), never stalls."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.celery_config import make_celery
from common.job_status import TERMINAL
from common.jobs import JobStatus
from tests.cluster import Cluster, running_cluster

FAULTY_APP = "tests.faulty_cpu_app"
KILLS_KEY = "videoqa:test:kill-moments"  # where FAULTY_APP counts; importing it would build a worker app here
# A pool process's death sends its message back at once; a whole worker's, after the visibility
# timeout. The reconciler would only after an hour, so a job that ends here ended through
# redelivery. Task limits leave room for a loaded machine.
CHILD_DEATH = {
    "VIDEOQA_VISIBILITY_TIMEOUT_S": "60",
    "VIDEOQA_TASK_TIME_LIMIT_S": "50",
    "VIDEOQA_RECONCILE_AFTER_S": "3600",
}
WORKER_DEATH = {
    "VIDEOQA_VISIBILITY_TIMEOUT_S": "24",
    "VIDEOQA_TASK_TIME_LIMIT_S": "20",
    "VIDEOQA_RECONCILE_AFTER_S": "3600",
}


@pytest.fixture()
def cluster(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Cluster]:
    with running_cluster(spare_redis_url, aws_env, tiny_model_dir, tmp_path, cpu=False, **CHILD_DEATH) as running:
        yield running


@pytest.fixture()
def restoring_cluster(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Cluster]:
    with running_cluster(spare_redis_url, aws_env, tiny_model_dir, tmp_path, cpu=False, **WORKER_DEATH) as running:
        yield running


def _moments_reached(cluster: Cluster) -> int:
    return int(redis.Redis.from_url(cluster.settings.redis_url).get(KILLS_KEY) or 0)


def _wait_moments(cluster: Cluster, count: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while _moments_reached(cluster) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{_moments_reached(cluster)} of {count} moments reached\n{cluster.diagnosis()}")
        time.sleep(0.1)


def _logs(cluster: Cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(cluster.logs.glob("*.log")))


def test_pool_process_killed_as_it_accepts_the_task_and_again_on_redelivery(
    cluster: Cluster, sample_videos: list[Path]
) -> None:
    """Each replacement pool process takes 6 s to start (a loaded machine; Celery's own start
    timeout is 4 s) and the first two die as they accept the task."""
    cluster.start_cpu(
        FAULTY_APP, VIDEOQA_TEST_KILL_AT="task_prerun", VIDEOQA_TEST_KILLS="2", VIDEOQA_TEST_SLOW_START_S="6"
    )
    job_id = cluster.submit(sample_videos[0], frames=2, new_tokens=3)
    job = cluster.wait_for(job_id, TERMINAL)
    assert job.status is JobStatus.SUCCEEDED, (job.error, cluster.diagnosis())
    # More than 3 when the message was held past the visibility timeout and came back once more
    # (it then finds the job moved on).
    assert _moments_reached(cluster) >= 3
    assert job.attempts == 1 and "sent again" not in _logs(cluster)


def test_pool_process_killed_after_the_task_ran_before_its_acknowledgement(
    cluster: Cluster, sample_videos: list[Path]
) -> None:
    """The work is done and the job handed to the GPU queue; the redelivered message finds it
    there and does nothing."""
    cluster.start_cpu(FAULTY_APP, VIDEOQA_TEST_KILL_AT="task_postrun")
    job_id = cluster.submit(sample_videos[0], frames=2, new_tokens=3)
    job = cluster.wait_for(job_id, TERMINAL)
    assert job.status is JobStatus.SUCCEEDED, (job.error, cluster.diagnosis())
    _wait_moments(cluster, 2)  # the redelivery ran too
    logs = _logs(cluster)
    assert re.search(rf"ingest: job {job_id} is \w+; nothing to do", logs), logs[-3000:]
    assert job.attempts == 1 and "sent again" not in logs


def test_worker_killed_with_the_message_taken_and_again_right_after_its_restore(
    restoring_cluster: Cluster, sample_videos: list[Path]
) -> None:
    """The whole worker dies holding the unacknowledged message; the next worker gets it back from
    the visibility timeout's restore scan and dies at once; the third runs it."""
    job_id = restoring_cluster.submit(sample_videos[1], frames=2, new_tokens=3)
    for death in (1, 2):
        name = restoring_cluster.start_cpu(FAULTY_APP, VIDEOQA_TEST_KILL_AT="task_received", VIDEOQA_TEST_KILLS="2")
        try:
            restoring_cluster.stack.processes[name].wait(300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {name} never took the message\n{restoring_cluster.diagnosis()}") from None
        assert _moments_reached(restoring_cluster) == death
        assert restoring_cluster.jobs.get(job_id).status is JobStatus.QUEUED
    restoring_cluster.start_cpu(FAULTY_APP, VIDEOQA_TEST_KILL_AT="task_received", VIDEOQA_TEST_KILLS="2")
    job = restoring_cluster.wait_for(job_id, TERMINAL)
    assert job.status is JobStatus.SUCCEEDED, (job.error, restoring_cluster.diagnosis())
    assert _moments_reached(restoring_cluster) >= 3 and "sent again" not in _logs(restoring_cluster)


def test_worker_killed_during_a_restore_scan_holds_restores_back_only_briefly(
    restoring_cluster: Cluster, sample_videos: list[Path]
) -> None:
    """A worker dies holding the message; another died in the middle of a restore scan, leaving
    the scan's lock behind with the expiry the service gives it. The message still comes back,
    well before the reconciler's hour."""
    job_id = restoring_cluster.submit(sample_videos[1], frames=2, new_tokens=3)
    name = restoring_cluster.start_cpu(FAULTY_APP, VIDEOQA_TEST_KILL_AT="task_received")
    try:
        restoring_cluster.stack.processes[name].wait(300)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {name} never took the message\n{restoring_cluster.diagnosis()}") from None
    options = make_celery(restoring_cluster.settings).conf.broker_transport_options
    broker = redis.Redis.from_url(restoring_cluster.settings.redis_url)
    assert broker.set("unacked_mutex", "a-dead-worker", nx=True, ex=options.get("unacked_mutex_expire", 300))
    restoring_cluster.start_cpu()
    job = restoring_cluster.wait_for(job_id, TERMINAL, timeout_s=240)
    assert job.status is JobStatus.SUCCEEDED, (job.error, restoring_cluster.diagnosis())
    assert "sent again" not in _logs(restoring_cluster)
