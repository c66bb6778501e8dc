"""Bounded input per job, on real Redis (a spare database): text shares one limit, a job's size in
tokens is checked at submission and again on the CPU worker, s3:// needs S3 storage, list cursors
are timestamps, and a late write never brings back an expired job record."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from api.app import create_app
from common.connections import redis_client
from common.jobs import KEY_PREFIX, JobStatus, JobStore
from common.schemas import MediaSource, Sampling, StoredRequest
from common.settings import Settings, load_settings
from common.storage import LocalStore
from worker.cpu.stage import IngestContext, ingest_job
from worker.fixtures.synthetic_videos import write_cat_video
from worker.media.geometry import FrameGeometry

VIDEO = {"url": "https://93.184.215.14/a.mp4"}


def _settings(spare_redis_url: str, tmp_path: Path, **extra: str) -> Settings:
    env = {"VIDEOQA_REDIS_URL": spare_redis_url, "VIDEOQA_STORAGE_URL": str(tmp_path / "store")}
    return load_settings(env | {f"VIDEOQA_{name.upper()}": value for name, value in extra.items()})


def _client(settings: Settings) -> FlaskClient:
    return create_app(settings).test_client()


def _job_keys(settings: Settings) -> list[bytes]:
    return list(redis.Redis.from_url(settings.redis_url).scan_iter(f"{KEY_PREFIX}*"))


def _error(response) -> dict:
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    return error


def test_question_and_prompt_share_one_limit_in_json_and_multipart(spare_redis_url: str, tmp_path: Path) -> None:
    settings = _settings(spare_redis_url, tmp_path, max_text_chars="1000")
    client = _client(settings)
    prompt = "<video> " + "p" * 600
    error = _error(client.post("/v1/jobs", json={"question": "q" * 500, "prompt": prompt, "videos": [VIDEO]}))
    assert error["details"] == [{"field": "prompt", "message": "1108 characters with the question; at most 1000"}]
    form = {"question": "q" * 500, "prompt": prompt, "videos": [(io.BytesIO(b"video"), "a.mp4")]}
    _error(client.post("/v1/jobs", data=form, content_type="multipart/form-data"))
    _error(client.post("/v1/jobs", json={"question": "q" * 1001, "videos": [VIDEO]}))
    # A prompt of megabytes is refused before anything is stored.
    _error(client.post("/v1/jobs", json={"question": "q", "prompt": "<video>" + "x" * 20_000_000, "videos": [VIDEO]}))
    assert _job_keys(settings) == []
    assert not (tmp_path / "store" / "uploads").exists()
    fits = client.post("/v1/jobs", json={"question": "q" * 400, "prompt": "<video> " + "p" * 592, "videos": [VIDEO]})
    assert fits.status_code == 202, fits.get_json()


def test_a_job_too_large_for_the_context_or_the_budget_is_refused_with_estimate_and_limit(
    spare_redis_url: str, tmp_path: Path
) -> None:
    client = _client(_settings(spare_redis_url, tmp_path))
    body = {
        "question": "q",
        "videos": [VIDEO, VIDEO],
        "sampling": {"num_frames": 32},
        "generation": {"max_new_tokens": 100},
    }
    error = _error(client.post("/v1/jobs", json=body))
    # 64 frames x 729 + (1 byte of question + 32 for the turn) + 100 new tokens.
    assert error["details"] == [
        {
            "field": "size",
            "message": "the job needs up to 46789 tokens (64 frames and images x 729 + 33 text + 100 new tokens); "
            "the limit is 32768 (the model's context)",
        }
    ]
    # fps sampling stops at num_frames too, so the same bound applies.
    _error(client.post("/v1/jobs", json=body | {"sampling": {"num_frames": 32, "fps": 2.0}}))
    # Images count like frames; multipart is checked the same way.
    form = {"question": "q", "num_frames": "32", "videos": [(io.BytesIO(b"v"), "a.mp4")] * 2}
    _error(client.post("/v1/jobs", data=form, content_type="multipart/form-data"))
    assert client.post("/v1/jobs", json=body | {"videos": [VIDEO]}).status_code == 202

    small = _client(_settings(spare_redis_url, tmp_path, max_job_tokens="6000"))
    eight_frames = {"question": "q", "videos": [VIDEO], "sampling": {"num_frames": 8}}
    assert small.post("/v1/jobs", json=eight_frames).status_code == 202  # 5965 tokens
    error = _error(small.post("/v1/jobs", json=eight_frames | {"images": [VIDEO]}))
    assert "needs up to 6694 tokens" in error["message"]
    assert "the limit is 6000 (the per-job budget of the GPU workers)" in error["message"]


def test_an_s3_url_without_s3_storage_is_refused_at_submission(spare_redis_url: str, tmp_path: Path) -> None:
    settings = _settings(spare_redis_url, tmp_path)
    error = _error(
        _client(settings).post("/v1/jobs", json={"question": "q", "videos": [{"url": "s3://bucket/cat.mp4"}]})
    )
    assert error["details"] == [
        {"field": "videos.0.url", "message": "s3:// URLs need S3 storage, and this service has none"}
    ]
    assert _job_keys(settings) == []


@pytest.mark.parametrize("before", ["nan", "NaN", "inf", "-inf", "1e999", "9" * 400, "-1", "1e300", "garbage", ""])
def test_a_list_cursor_that_is_no_timestamp_is_a_bad_request(local_settings: Settings, before: str) -> None:
    response = _client(local_settings).get(f"/v1/jobs?before={before}")
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == "invalid_request"


def test_a_valid_list_cursor_still_pages(local_settings: Settings) -> None:
    response = _client(local_settings).get(f"/v1/jobs?before={time.time()}&limit=5")
    assert response.status_code == 200
    assert response.get_json()["jobs"] == []


def test_a_late_write_never_recreates_an_expired_record(local_settings: Settings) -> None:
    jobs = JobStore(redis_client(local_settings), ttl_s=local_settings.job_ttl_s)
    client = redis_client(local_settings)
    gone = jobs.create({})
    client.pexpire(JobStore.key(gone.id), 1)
    deadline = time.monotonic() + 30
    while client.exists(JobStore.key(gone.id)) and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.mark(gone.id, "generate", "end")
    jobs.note_retry(gone.id)
    assert not jobs.begin_attempt(gone.id, max_attempts=3)
    assert jobs.add_attempt(gone.id) == 0
    assert client.exists(JobStore.key(gone.id)) == 0

    removed = jobs.create({})
    client.delete(JobStore.key(removed.id))
    jobs.mark(removed.id, "ingest", "end")
    assert client.exists(JobStore.key(removed.id)) == 0

    # A job that ended keeps its retention when a stage time arrives late.
    ended = jobs.create({})
    assert jobs.cancel(ended.id)
    jobs.mark(ended.id, "generate", "end", at=123.0)
    assert 0 < client.ttl(JobStore.key(ended.id)) <= local_settings.job_ttl_s
    stored = jobs.get(ended.id)
    assert stored is not None and stored.status is JobStatus.CANCELLED
    assert stored.stages["generate"] == {"end": 123.0}


def test_the_cpu_worker_checks_the_frames_it_sampled_before_a_gpu_sees_them(
    spare_redis_url: str, tmp_path: Path
) -> None:
    """An API with larger limits than its workers let the job through; the CPU worker, after
    sampling, fails it with the estimate and its own limit, and never enqueues it for a GPU."""
    settings = _settings(spare_redis_url, tmp_path, max_job_tokens="2000", decode_memory_mb="220")
    sent: list[str] = []
    ctx = IngestContext(
        settings=settings,
        jobs=JobStore(redis_client(settings), ttl_s=settings.job_ttl_s),
        store=LocalStore(Path(settings.storage_url)),
        geometry=lambda: FrameGeometry(64, 64, 3),
        enqueue_answer=sent.append,
    )
    video = write_cat_video(tmp_path / "cat.mp4", seconds=2, fps=10, width=160, height=120)
    ctx.store.put_file("uploads/cat.mp4", video)
    source = MediaSource(kind="upload", location="uploads/cat.mp4")

    def run(**sampling: float) -> JobStatus:
        request = StoredRequest(
            question="q", prompt=None, videos=[source], images=[], sampling=Sampling(**sampling), generation={}
        )
        job = ctx.jobs.create(request.model_dump(mode="json"))
        ingest_job(job.id, ctx)
        done = ctx.jobs.get(job.id)
        assert done is not None
        if done.status is JobStatus.FAILED:
            assert done.error is not None and done.error["code"] == "invalid_request"
            # 3 frames x 729 + 33 text + 100 new tokens.
            assert done.error["message"].startswith("the job needs up to 2320 tokens (3 frames and images x 729")
            assert "the limit is 2000" in done.error["message"]
        return done.status

    assert run(num_frames=3) is JobStatus.FAILED
    # fps sampling: one frame a second over 2 s gives 2 frames, however large num_frames is.
    assert run(num_frames=3, fps=1.0) is JobStatus.QUEUED_GPU
    assert len(sent) == 1


def test_a_gpu_worker_names_size_settings_its_model_disagrees_with(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    from worker.app.resources import size_setting_mismatches

    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = str(tiny_model_dir)
    assert size_setting_mismatches(config, load_settings({"VIDEOQA_MODEL": model})) == []
    wrong = load_settings({"VIDEOQA_MODEL": model, "VIDEOQA_IMAGE_TOKENS": "576", "VIDEOQA_CONTEXT_TOKENS": "65536"})
    assert size_setting_mismatches(config, wrong) == [
        f"VIDEOQA_IMAGE_TOKENS is 576 but {model} takes 729 tokens per image: job sizes are estimated wrong; "
        "set it on the API and the workers",
        f"VIDEOQA_CONTEXT_TOKENS is 65536 but {model} has a context of 32768 tokens",
    ]
