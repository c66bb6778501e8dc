"""Chat completion requests as jobs (api.chat_request), without the service: messages to turns,
media in order, the extra sampling fields, and refusals that name the parameter."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from api.chat_request import chat_job, served_model_ids
from common.errors import InvalidRequest, NotFound
from common.schemas import JobRequest, MediaInput
from common.settings import load_settings

SETTINGS = load_settings({"VIDEOQA_MODEL": "llava-hf/llava-interleave-qwen-7b-hf"})
MODEL = "llava-hf/llava-interleave-qwen-7b-hf"
VIDEO = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _chat(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, **fields}


def test_one_user_message_is_a_plain_job_with_its_media_first() -> None:
    chat = chat_job(_chat([{"role": "user", "content": [_text("Same?"), VIDEO, VIDEO, IMAGE]}]), SETTINGS)
    assert chat.body["question"] == "Same?" and "prompt" not in chat.body and chat.body["history"] == []
    assert [m.kind for m in chat.videos + chat.images] == ["video", "video", "image"]
    assert not chat.stream


def test_an_image_before_a_video_keeps_its_place_with_a_prompt_of_placeholders() -> None:
    chat = chat_job(_chat([{"role": "user", "content": [IMAGE, VIDEO, _text("Which?")]}]), SETTINGS)
    assert chat.body["prompt"] == "<image><video>" and chat.body["question"] == "Which?"


def test_earlier_messages_are_history_with_their_media_as_placeholders() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [VIDEO, _text("What is it?"), _text("Say it.")]},
        {"role": "assistant", "content": [_text("A cat.")]},
        {"role": "user", "content": [IMAGE, _text("And this?")]},
    ]
    chat = chat_job(_chat(messages), SETTINGS)
    assert chat.body["history"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<video>\nWhat is it?\nSay it."},
        {"role": "assistant", "content": "A cat."},
    ]
    # Earlier turns place media, so the last one places its own.
    assert chat.body["prompt"] == "<image>" and chat.body["question"] == "And this?"
    request = JobRequest.parse(
        {
            **chat.body,
            "videos": [{"url": "https://example.com/a.mp4"}],
            "images": [{"url": "https://example.com/a.png"}],
        },
        SETTINGS,
    )
    assert len(request.history) == 3


def test_sampling_and_generation_fields_as_vllm_users_send_them() -> None:
    chat = chat_job(
        _chat(
            [{"role": "user", "content": [VIDEO, _text("Q?")]}],
            media_io_kwargs={"video": {"num_frames": 4}},
            mm_processor_kwargs={"fps": 2.0},
            max_tokens=7,
            max_completion_tokens=9,
            temperature=0.7,
            top_p=0.9,
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            user="someone",
        ),
        SETTINGS,
    )
    assert chat.body["sampling"] == {"num_frames": 4, "fps": 2.0}
    assert chat.body["generation"] == {"max_new_tokens": 9, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert chat.stream and chat.include_usage
    greedy = chat_job(_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], temperature=0), SETTINGS)
    assert greedy.body["generation"] == {}


def test_a_data_url_is_decoded_and_a_stored_video_needs_video_ids() -> None:
    png = b"\x89PNG fake bytes"
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    chat = chat_job(_chat([{"role": "user", "content": [part, _text("Q?")]}]), SETTINGS)
    assert (chat.images[0].data, chat.images[0].mime) == (png, "image/png")
    stored = {"type": "video_url", "video_url": {"url": "videoqa://videos/abc123"}}
    if "video_id" in MediaInput.model_fields:
        assert chat_job(_chat([{"role": "user", "content": [stored, _text("Q?")]}]), SETTINGS).videos[0].as_input() == {
            "video_id": "abc123"
        }
    else:
        with pytest.raises(InvalidRequest, match="stored videos"):
            chat_job(_chat([{"role": "user", "content": [stored, _text("Q?")]}]), SETTINGS)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            _chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
            "messages[0].content[0].type",
        ),
        (_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], n=2), "n"),
        (_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], stop=["x"]), "stop"),
        (_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], best_of=2), "best_of"),
        (_chat([{"role": "user", "content": [VIDEO]}]), "messages[0].content"),
        (
            _chat([{"role": "user", "content": [VIDEO, _text("Q?")]}, {"role": "assistant", "content": "A"}]),
            "messages[1]",
        ),
        (
            _chat([{"role": "tool", "content": "x", "tool_call_id": "1"}, {"role": "user", "content": "Q?"}]),
            "messages[0].role",
        ),
        (
            _chat([{"role": "assistant", "content": [IMAGE]}, {"role": "user", "content": "Q?"}]),
            "messages[0].content[0].type",
        ),
        (
            _chat([{"role": "user", "content": "a <video> tag?"}, {"role": "user", "content": [VIDEO, _text("Q?")]}]),
            "messages[0].content",
        ),
        (
            _chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, _text("Q")],
                    }
                ]
            ),
            "messages[0].content[0].image_url.url",
        ),
        (
            _chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, _text("Q")],
                    }
                ]
            ),
            "messages[0].content[0].image_url.url",
        ),
        (
            _chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], media_io_kwargs={"video": {"start": 1}}),
            "media_io_kwargs.video.start",
        ),
        (_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], temperature=3), "temperature"),
        (_chat([]), "messages"),
        ({"messages": [{"role": "user", "content": "Q?"}]}, "model"),
    ],
)
def test_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        chat_job(body, SETTINGS)
    assert refused.value.details[0]["field"] == param, refused.value.message


def test_the_served_model_is_videoqa_model_or_its_last_path_segment() -> None:
    assert served_model_ids(SETTINGS) == [MODEL, "llava-interleave-qwen-7b-hf"]
    chat_job(_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], model="llava-interleave-qwen-7b-hf"), SETTINGS)
    with pytest.raises(NotFound) as unknown:
        chat_job(_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}], model="gpt-4o"), SETTINGS)
    assert unknown.value.code == "model_not_found"


def test_chat_completions_share_the_submission_rate_limit_and_refuse_in_openais_shape(
    spare_redis_url: str, tmp_path: Path
) -> None:
    """Through the app and real Redis (the spare database): one submission a minute per client."""
    settings = load_settings(
        {"VIDEOQA_REDIS_URL": spare_redis_url, "VIDEOQA_STORAGE_URL": str(tmp_path), "VIDEOQA_RATE_LIMIT": "1/minute"}
    )
    client = create_app(settings).test_client()
    first = client.post("/v1/jobs", json={"question": "What?", "videos": [{"url": "https://93.184.215.14/a.mp4"}]})
    assert first.status_code == 202
    refused = client.post("/v1/chat/completions", json=_chat([{"role": "user", "content": [VIDEO, _text("Q?")]}]))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    assert set(refused.get_json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/models").status_code == 200  # reads are not counted
