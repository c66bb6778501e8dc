"""The Python client against the running service: submit, get, wait, list, cancel, ask, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.client import APIError, Client, Frame, JobFailed, Result, VideoQAError, WaitTimedOut
from tests.conftest import BUCKET, RunningService

QUESTION = "What is the cat doing?"


@pytest.fixture()
def client(service: RunningService) -> Client:
    return Client(service.base_url)


def test_upload_get_wait_and_list(client: Client, sample_videos: list[Path]) -> None:
    job = client.submit([sample_videos[0]], QUESTION, sampling={"num_frames": 2}, generation={"max_new_tokens": 3})
    assert job.status == "queued" and not job.done
    assert client.get(job.id).id == job.id
    done = client.wait(job.id, timeout=240)
    assert done.status == "succeeded", done.error
    assert done.result is not None and done.result.job_id == job.id
    assert done.result.frames == [Frame(video=0, index=0, time=0.0), Frame(video=0, index=60, time=2.0)]
    assert 1 <= done.result.usage.completion_tokens <= 3
    assert done.raw["request"]["sampling"]["num_frames"] == 2
    assert job.id in [listed.id for listed in client.list(limit=100).jobs]


def test_ask_s3_keys_gives_a_typed_result(client: Client, s3, sample_videos: list[Path]) -> None:
    for path in sample_videos:
        s3.upload_file(str(path), BUCKET, f"client/{path.name}")
    keys = [f"s3://{BUCKET}/client/{path.name}" for path in sample_videos]
    result = client.ask(keys, QUESTION, sampling={"num_frames": 2}, generation={"max_new_tokens": 3}, timeout=240)
    assert isinstance(result, Result) and isinstance(result.answer, str)
    assert [(frame.video, frame.index) for frame in result.frames] == [(0, 0), (0, 60), (1, 0), (1, 60)]
    assert {"ingest", "generate", "total"} <= set(result.timings)
    assert client.get(result.job_id).result == result


def test_errors_carry_the_api_code_and_status(client: Client, tmp_path: Path) -> None:
    with pytest.raises(APIError) as unknown:
        client.get("no-such-job")
    assert (unknown.value.code, unknown.value.http_status) == ("not_found", 404)

    with pytest.raises(APIError) as refused:
        client.submit([], QUESTION)
    assert (refused.value.code, refused.value.http_status) == ("invalid_request", 400)
    assert refused.value.details == [{"field": "videos", "message": "at least one video or image is required"}]

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 100)
    with pytest.raises(JobFailed) as failed:
        client.ask([corrupt], QUESTION, sampling={"num_frames": 2}, timeout=240)
    assert failed.value.code == "invalid_media" and failed.value.job.status == "failed"

    with pytest.raises(APIError) as ended:
        client.cancel(failed.value.job.id)
    assert (ended.value.code, ended.value.http_status) == ("conflict", 409)
    assert all(isinstance(e.value, VideoQAError) for e in (unknown, refused, failed, ended))


def test_cancel_and_a_wait_that_runs_out(client: Client, sample_videos: list[Path]) -> None:
    job = client.submit([sample_videos[0]], QUESTION, sampling={"num_frames": 8}, generation={"max_new_tokens": 400})
    # Milliseconds after the submission, the job cannot have been sampled and answered already.
    with pytest.raises(WaitTimedOut) as waited:
        client.wait(job.id, timeout=0.01)
    assert waited.value.job.id == job.id and not waited.value.job.done
    assert client.cancel(job.id).status == "cancelled"
    ended = client.wait(job.id, timeout=60)
    assert ended.status == "cancelled"
    assert JobFailed(ended).code == "cancelled"
