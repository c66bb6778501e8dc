"""The CPU stage's hand-off to the GPU stage through a real job record in Redis: what it stores is
the JSON records have always held, a record written before the version field reads the same, and
one from a newer release fails clearly."""

from __future__ import annotations

import json

import pytest

from common.connections import redis_client
from common.handoff import (
    HANDOFF_VERSION,
    FrameRef,
    Handoff,
    HandoffUnreadable,
    ImageMedia,
    StoredFrame,
    VideoMedia,
    dump_frames,
    load_frames,
)
from common.jobs import JobStatus, JobStore
from common.settings import Settings

# A record's media as CPU workers wrote it before the hand-off had a type or a version.
LEGACY_MEDIA = [
    {
        "kind": "video",
        "position": 0,
        "frames": [
            {"index": 0, "time": 0.0, "key": "frames/a/p1/0000.png"},
            {"index": 48, "time": 1.6, "key": "frames/a/p1/0001.png", "offset": -0.2},
            {"index": 96, "time": 3.2, "key": "frames/a/p1/0002.png", "stands_in_for": {"index": 95, "time": 3.166667}},
        ],
    },
    {"kind": "video", "position": 1, "frames": [{"index": 10, "time": 0.333333, "key": "frames/b/p1/0000.png"}]},
    {"kind": "image", "position": 0, "key": "images/c-p1.png"},
]
LEGACY_TIMINGS = {"download": 0.12, "decode": 0.5, "store_frames": 0.03}
# What the GPU stage put in a result's ``frames`` for LEGACY_MEDIA, which API clients read.
RESULT_FRAMES = [
    {"video": 0, "index": 0, "time": 0.0},
    {"video": 0, "index": 48, "time": 1.6, "offset": -0.2},
    {"video": 0, "index": 96, "time": 3.2, "stands_in_for": {"index": 95, "time": 3.166667}},
    {"video": 1, "index": 10, "time": 0.333333},
]


@pytest.fixture()
def jobs(local_settings: Settings) -> JobStore:
    return JobStore(redis_client(local_settings), ttl_s=600)


def test_a_handoff_is_stored_as_the_records_have_always_held_it(jobs: JobStore) -> None:
    handoff = Handoff(
        media=[
            VideoMedia(position=0, frames=[
                StoredFrame(index=0, time=0.0, key="frames/a/p1/0000.png"),
                StoredFrame(index=48, time=1.6, key="frames/a/p1/0001.png", offset=-0.2),
                StoredFrame(index=96, time=3.2, key="frames/a/p1/0002.png", stands_in_for=FrameRef(index=95, time=3.166667)),
            ]),
            VideoMedia(position=1, frames=[StoredFrame(index=10, time=0.333333, key="frames/b/p1/0000.png")]),
            ImageMedia(position=0, key="images/c-p1.png"),
        ],
        ingest_timings=LEGACY_TIMINGS,
    )  # fmt: skip
    job = jobs.create({"question": "q"})
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, **handoff.record_fields())
    raw = jobs.client.hgetall(jobs.key(job.id))
    assert json.loads(raw["media"]) == LEGACY_MEDIA
    assert json.loads(raw["ingest_timings"]) == LEGACY_TIMINGS
    assert raw["handoff_version"] == str(HANDOFF_VERSION)
    read = Handoff.of(jobs.get(job.id))
    assert read == handoff
    assert read.result_frames() == RESULT_FRAMES
    assert read.image_count == 5
    assert read.storage_keys() == {
        "frames/a/p1/0000.png", "frames/a/p1/0001.png", "frames/a/p1/0002.png", "frames/b/p1/0000.png", "images/c-p1.png"
    }  # fmt: skip


def test_a_record_written_before_the_version_field_reads_as_version_one(jobs: JobStore) -> None:
    job = jobs.create({"question": "q"})
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, media=LEGACY_MEDIA, ingest_timings=LEGACY_TIMINGS)
    read = Handoff.of(jobs.get(job.id))
    assert read.version == 1
    assert read.result_frames() == RESULT_FRAMES
    assert read.ingest_timings == LEGACY_TIMINGS
    assert read.record_fields()["media"] == LEGACY_MEDIA


def test_a_record_from_a_newer_release_fails_clearly(jobs: JobStore) -> None:
    job = jobs.create({"question": "q"})
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, media=LEGACY_MEDIA, handoff_version=str(HANDOFF_VERSION + 1))
    with pytest.raises(HandoffUnreadable, match=f"newer CPU worker .*version {HANDOFF_VERSION + 1}") as caught:
        Handoff.of(jobs.get(job.id))
    assert caught.value.code == "internal"


def test_entries_that_do_not_parse_fail_clearly(jobs: JobStore) -> None:
    job = jobs.create({"question": "q"})
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, media=[{"kind": "audio", "position": 0}])
    with pytest.raises(HandoffUnreadable, match="prepared media cannot be read"):
        Handoff.of(jobs.get(job.id))


def test_a_stored_manifest_keeps_its_json() -> None:
    entries = LEGACY_MEDIA[0]["frames"]
    frames = load_frames(json.loads(json.dumps(entries)))
    assert dump_frames(frames) == entries
