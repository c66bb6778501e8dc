"""Nothing grows for ever: the sweeper on a local store and on S3 (moto's server over HTTP), the
bucket's lifecycle rule, index entries trimmed with their records, and the sweep run by a real
CPU worker on its timer."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import redis

from common.connections import redis_client
from common.jobs import INDEX_KEY, TENANT_INDEX_PREFIX, JobStatus, JobStore
from common.settings import Settings
from common.storage import LocalStore, ObjectStore, S3Store
from tests.conftest import BUCKET, service_env
from worker.cli.stack import Stack, cpu_worker_command
from worker.cpu.sweeper import LOCK_KEY, UPLOAD_GRACE_S, sweep, trim_indexes

RETENTION_S = 7 * 24 * 3600
DAY_S = 24 * 3600


def _live_and_ended_jobs(jobs: JobStore) -> tuple[str, str]:
    """A job waiting for the GPU that names an upload, frames and an image; and an ended one."""
    live = jobs.create({"videos": [{"kind": "upload", "location": "uploads/live/video-0-a.mp4"}]}, job_id="live")
    media = [
        {"kind": "video", "position": 0, "frames": [{"index": 0, "time": 0.0, "key": "frames/old/p1/0000.png"}]},
        {"kind": "image", "position": 0, "key": "images/old-p1.png"},
    ]
    jobs.transition(live.id, JobStatus.QUEUED_GPU, media=media)
    ended = jobs.create({"videos": [{"kind": "upload", "location": "uploads/ended/video-0-b.mp4"}]}, job_id="ended")
    jobs.fail(ended.id, "invalid_media", "not a video")
    return live.id, ended.id


OLD_KEYS = {
    # named by the live job: kept however old
    "uploads/live/video-0-a.mp4": True,
    "frames/old/p1/0000.png": True,
    "images/old-p1.png": True,
    # nobody's any more, and old: deleted
    "uploads/ended/video-0-b.mp4": False,
    "uploads/never-created/video-0-c.mp4": False,
    "frames/old/p1/0001.png": False,
    "frames/old/p1/manifest.json": False,
    "tenants/acme/sources/http/0a1b.json": False,
    "tenants/acme/images/x-p0.png": False,
}


def test_the_sweeper_deletes_old_objects_and_keeps_those_of_live_jobs(local_settings: Settings, tmp_path: Path) -> None:
    client = redis_client(local_settings)
    jobs = JobStore(client, ttl_s=600)
    store = LocalStore(tmp_path / "store")
    _live_and_ended_jobs(jobs)
    now = time.time()
    for key in OLD_KEYS:
        store.put_bytes(key, b"x")
        os.utime(store.root / key, (now - 2 * RETENTION_S, now - 2 * RETENTION_S))
    young = ["frames/young/p9/0000.png", "uploads/being-submitted/video-0-d.mp4"]
    for key in young:
        store.put_bytes(key, b"x")

    outcome = sweep(client, jobs, store, retention_s=RETENTION_S, job_ttl_s=600)

    assert outcome is not None and outcome.deleted == 6 and outcome.live_jobs == 1
    left = {stored.key for stored in store.list_objects()}
    assert left == {key for key, kept in OLD_KEYS.items() if kept} | set(young)
    # Directories emptied by the sweep go too.
    assert not (store.root / "tenants").exists() and not (store.root / "uploads" / "ended").exists()
    assert not client.exists(LOCK_KEY)


def test_the_sweeper_works_on_s3_and_the_bucket_gets_a_lifecycle_rule(s3, spare_redis_url: str) -> None:
    prefix = f"retention-{uuid.uuid4().hex[:8]}"
    # An operator's rule of the same bucket must survive ours.
    s3.put_bucket_lifecycle_configuration(
        Bucket=BUCKET,
        LifecycleConfiguration={
            "Rules": [{"ID": "operator", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 3}}]
        },
    )
    store: ObjectStore = S3Store(BUCKET, prefix)
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    jobs = JobStore(client, ttl_s=DAY_S)
    _live_and_ended_jobs(jobs)
    for key in [*OLD_KEYS, *(f"frames/many/p0/{n:04d}.png" for n in range(1100))]:
        store.put_bytes(key, b"x")

    # S3 cannot backdate an object: the sweep looks from two retentions ahead instead.
    outcome = sweep(client, jobs, store, retention_s=RETENTION_S, job_ttl_s=DAY_S, now=time.time() + 2 * RETENTION_S)

    assert outcome is not None and outcome.expiration_rule
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    assert {item["Key"] for item in listed} == {f"{prefix}/{key}" for key, kept in OLD_KEYS.items() if kept}
    rules = {rule["ID"]: rule for rule in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    assert rules["operator"]["Filter"] == {"Prefix": "logs/"}
    ours = rules[f"videoqa-expiration:{prefix}"]
    assert ours["Filter"] == {"Prefix": f"{prefix}/"} and ours["Status"] == "Enabled"
    assert ours["Expiration"] == {"Days": 8}  # the retention plus the records' lifetime, in days

    # A second sweep keeps one rule of ours, not two.
    sweep(client, jobs, store, retention_s=RETENTION_S, job_ttl_s=DAY_S)
    ids = [rule["ID"] for rule in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]]
    assert sorted(ids) == sorted(["operator", f"videoqa-expiration:{prefix}"])


def test_index_entries_go_with_their_records(spare_redis_url: str) -> None:
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    short_lived = JobStore(client, ttl_s=1)
    gone = [short_lived.create({}, tenant=tenant).id for tenant in ("acme", "beta", "acme")]
    deadline = time.monotonic() + 60
    while any(client.exists(JobStore.key(job_id)) for job_id in gone):
        assert time.monotonic() < deadline, "the records never expired"
        time.sleep(0.2)
    kept = JobStore(client, ttl_s=600).create({}, tenant="acme").id
    client.zadd(INDEX_KEY, {"long-forgotten": 1.0})

    assert trim_indexes(client, ttl_s=600, now=time.time()) == 2 * len(gone) + 1

    assert client.zrange(INDEX_KEY, 0, -1) == [kept]
    assert client.zrange(TENANT_INDEX_PREFIX + "acme", 0, -1) == [kept]
    assert not client.exists(TENANT_INDEX_PREFIX + "beta")


def test_a_cpu_worker_sweeps_on_its_timer(
    spare_redis_url: str, aws_env: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = service_env(
        spare_redis_url,
        aws_env,
        tiny_model_dir,
        VIDEOQA_STORAGE_URL=str(tmp_path / "store"),
        VIDEOQA_SWEEP_INTERVAL_S="0.5",
    )
    store = LocalStore(tmp_path / "store")
    store.put_bytes("frames/old/p0/0000.png", b"x")
    store.put_bytes("uploads/never-created/video-0-a.mp4", b"x")
    past = time.time() - RETENTION_S - UPLOAD_GRACE_S - 60
    for key in ("frames/old/p0/0000.png", "uploads/never-created/video-0-a.mp4"):
        os.utime(store.root / key, (past, past))
    store.put_bytes("frames/young/p0/0000.png", b"x")
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    client.zadd(INDEX_KEY, {"expired-job": time.time() - 30 * DAY_S})

    stack = Stack(env=env, logs=tmp_path)
    stack.start("cpu", cpu_worker_command(concurrency=1))
    try:
        deadline = time.monotonic() + 120
        while store.exists("frames/old/p0/0000.png") or client.zcard(INDEX_KEY):
            assert time.monotonic() < deadline, (tmp_path / "cpu.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        stack.stop()
    assert {stored.key for stored in store.list_objects()} == {"frames/young/p0/0000.png"}
