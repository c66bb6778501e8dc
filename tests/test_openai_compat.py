"""The OpenAI-compatible routes through the running service (gunicorn, a CPU and a GPU worker, the
tiny model), with the official ``openai`` package as the client: each answer equals the same
question's answer through ``POST /v1/jobs``."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from PIL import Image

from common.api_keys import hash_key
from common.job_status import TERMINAL
from tests.conftest import BUCKET, REDIS_HOST, SPARE_REDIS_DB, RunningService, _flushed, service_env, start_service

KEY = "vqa_openai_test_key"
QUESTION = "What is happening in this video?"


@pytest.fixture(scope="module")
def keyed_service(
    aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """A service with an API key, on the spare database: its workers are its own."""
    url = f"redis://{REDIS_HOST}/{SPARE_REDIS_DB}"
    client = _flushed(url)
    env = service_env(url, aws_env, tiny_model_dir, VIDEOQA_API_KEYS=f"tester:{hash_key(KEY)}:s3://{BUCKET}/openai/")
    running = start_service(env, tmp_path_factory.mktemp("openai-logs"))
    try:
        running.client.wait_until_up(120)
        yield running
    finally:
        running.stack.stop()
        client.flushdb()


@pytest.fixture(scope="module")
def video_urls(s3, sample_videos: list[Path]) -> list[str]:
    for path in sample_videos:
        s3.upload_file(str(path), BUCKET, f"openai/{path.name}")
    return [f"s3://{BUCKET}/openai/{path.name}" for path in sample_videos]


@pytest.fixture()
def client(keyed_service: RunningService) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed_service.url("/v1"), api_key=KEY, max_retries=0, timeout=300)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _ended(service: RunningService, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = requests.get(service.url(f"/v1/jobs/{job_id}?wait=30"), headers=_auth(), timeout=60).json()
        if job["status"] in TERMINAL:
            return job
    raise AssertionError(f"job {job_id} did not end\n{service.tail_logs()}")


def _job(service: RunningService, body: dict[str, Any]) -> dict[str, Any]:
    """The same question as a plain job through ``POST /v1/jobs``, once it has ended."""
    response = requests.post(service.url("/v1/jobs"), json=body, headers=_auth(), timeout=60)
    assert response.status_code == 202, response.text
    job = _ended(service, response.json()["id"])
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    return job


def _video_turn(url: str, text: str) -> Any:
    # Any: a video part is this API's extension of the chat format; the SDK's message types lack it.
    return {
        "role": "user",
        "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}],
    }


def test_a_completion_equals_the_same_jobs_answer_with_usage_and_the_job_id(
    keyed_service: RunningService, client: openai.OpenAI, video_urls: list[str]
) -> None:
    model = keyed_service.env["VIDEOQA_MODEL"]
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[_video_turn(video_urls[0], QUESTION)],
        max_tokens=12,
        temperature=0,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 3}}},
    )
    completion = raw.parse()
    job_id = raw.headers["X-Videoqa-Job-Id"]
    assert completion.id == f"chatcmpl-{job_id}" and completion.object == "chat.completion"
    assert completion.model == model
    behind = _ended(keyed_service, job_id)
    assert behind["request"]["sampling"]["num_frames"] == 3 and behind["request"]["prompt"] is None

    job = _job(
        keyed_service,
        {
            "question": QUESTION,
            "videos": [{"url": video_urls[0]}],
            "sampling": {"num_frames": 3},
            "generation": {"max_new_tokens": 12},
        },
    )
    result = job["result"]
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == result["answer"] and result["answer"]
    assert choice.finish_reason == result["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == result["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == result["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert behind["result"]["frames"] == result["frames"]


def test_streamed_chunks_concatenate_to_the_answer_and_end_with_a_reason_and_usage(
    keyed_service: RunningService, client: openai.OpenAI, video_urls: list[str]
) -> None:
    stream = client.chat.completions.create(
        model=keyed_service.env["VIDEOQA_MODEL"],
        messages=[_video_turn(video_urls[1], QUESTION)],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mm_processor_kwargs": {"num_frames": 2}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({chunk.id for chunk in chunks}) == 1
    with_choices = [chunk for chunk in chunks if chunk.choices]
    reasons = [chunk.choices[0].finish_reason for chunk in with_choices if chunk.choices[0].finish_reason]
    assert len(reasons) == 1 and with_choices[-1].choices[0].finish_reason == reasons[0]
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None

    job = _ended(keyed_service, chunks[0].id.removeprefix("chatcmpl-"))
    assert job["status"] == "succeeded"
    assert answer == job["result"]["answer"] and answer
    assert reasons[0] == job["result"]["finish_reason"]
    assert chunks[-1].usage.completion_tokens == job["result"]["usage"]["completion_tokens"]
    same = _job(
        keyed_service,
        {
            "question": QUESTION,
            "videos": [{"url": video_urls[1]}],
            "sampling": {"num_frames": 2},
            "generation": {"max_new_tokens": 20},
        },
    )
    assert answer == same["result"]["answer"]


def test_an_earlier_assistant_turn_is_the_jobs_history(
    keyed_service: RunningService, client: openai.OpenAI, video_urls: list[str]
) -> None:
    earlier = "A small grey cat jumps onto the wooden table."
    completion = client.chat.completions.create(
        model=Path(keyed_service.env["VIDEOQA_MODEL"]).name,  # the alias
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            _video_turn(video_urls[0], QUESTION),
            {"role": "assistant", "content": earlier},
            {"role": "user", "content": "What does it knock over?"},
        ],
        max_tokens=10,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}},
    )
    job = _job(
        keyed_service,
        {
            "question": "What does it knock over?",
            "videos": [{"url": video_urls[0]}],
            "history": [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": f"<video>\n{QUESTION}"},
                {"role": "assistant", "content": earlier},
            ],
            "sampling": {"num_frames": 2},
            "generation": {"max_new_tokens": 10},
        },
    )
    assert completion.choices[0].message.content == job["result"]["answer"]
    assert completion.usage is not None and completion.usage.prompt_tokens == job["result"]["usage"]["prompt_tokens"]


def test_an_image_sent_as_a_data_url_is_stored_as_an_upload(
    keyed_service: RunningService, client: openai.OpenAI
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    raw = client.chat.completions.with_raw_response.create(
        model=keyed_service.env["VIDEOQA_MODEL"],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
                    },
                ],
            }
        ],
        max_tokens=8,
    )
    behind = _ended(keyed_service, raw.headers["X-Videoqa-Job-Id"])
    assert behind["request"]["images"][0]["kind"] == "upload"
    response = requests.post(
        keyed_service.url("/v1/jobs"),
        files=[("images", ("red.png", png, "image/png"))],
        data={"question": "What colour is this?", "max_new_tokens": "8"},
        headers=_auth(),
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job = _ended(keyed_service, response.json()["id"])
    assert raw.parse().choices[0].message.content == job["result"]["answer"]


def test_bad_requests_raise_the_openai_packages_typed_errors(
    keyed_service: RunningService, client: openai.OpenAI, video_urls: list[str]
) -> None:
    model = keyed_service.env["VIDEOQA_MODEL"]
    with pytest.raises(openai.BadRequestError) as unknown_part:
        client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
            ],
        )
    assert unknown_part.value.status_code == 400
    assert unknown_part.value.param == "messages[0].content[0].type" and unknown_part.value.code == "invalid_request"
    assert unknown_part.value.type == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model=model, messages=[_video_turn(video_urls[0], QUESTION)], n=2)
    assert two.value.param == "n"

    with pytest.raises(openai.NotFoundError) as no_model:
        client.chat.completions.create(model="gpt-4o", messages=[_video_turn(video_urls[0], QUESTION)])
    assert no_model.value.code == "model_not_found"

    with pytest.raises(openai.AuthenticationError) as wrong_key:
        openai.OpenAI(base_url=keyed_service.url("/v1"), api_key="not-a-key", max_retries=0).models.list()
    assert wrong_key.value.type == "authentication_error"
    missing = requests.get(keyed_service.url("/v1/models"), timeout=10)
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}

    assert [m.id for m in client.models.list()] == [model, Path(model).name]
    assert client.models.retrieve(Path(model).name).id == Path(model).name


def test_a_streaming_client_that_leaves_early_cancels_its_job(
    keyed_service: RunningService, client: openai.OpenAI, video_urls: list[str]
) -> None:
    stream = client.chat.completions.create(
        model=keyed_service.env["VIDEOQA_MODEL"],
        messages=[_video_turn(video_urls[0], "Describe the scene in detail.")],
        max_tokens=512,
        stream=True,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}},
    )
    job_id = ""
    for chunk in stream:
        job_id = chunk.id.removeprefix("chatcmpl-")
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the answer has started: the job is generating
    stream.close()
    job = _ended(keyed_service, job_id)
    assert job["status"] == "cancelled", (job, keyed_service.tail_logs())
    assert job["result"] is None


def test_a_job_that_fails_is_an_error_answer_or_the_streams_last_event(
    keyed_service: RunningService, client: openai.OpenAI
) -> None:
    garbage = "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 64).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": garbage}}, {"type": "text", "text": QUESTION}],
        }
    ]
    model = keyed_service.env["VIDEOQA_MODEL"]
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert failed.value.code == "invalid_media"
    chunks = []
    with pytest.raises(openai.APIError) as streamed:
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True):
            chunks.append(chunk)
    assert streamed.value.code == "invalid_media"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _ended(keyed_service, chunks[0].id.removeprefix("chatcmpl-"))["status"] == "failed"
