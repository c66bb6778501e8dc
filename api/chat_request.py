"""An OpenAI chat completion request (``POST /v1/chat/completions``) as a job request.

Messages become the job's turns: the last one, a user message, is the job's own turn; the ones
before it are its ``history`` (docs/conversations.md). Each user message's media parts become the
job's videos and images in the order they are sent, and placeholders where they stood; the chat
template renders a turn's images before its text, as it does for any client of this model. See
docs/openai.md for the fields and what each maps to.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidRequest, NotFound
from common.schemas import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MediaInput
from common.settings import Settings

STORED_VIDEO_URL = "videoqa://videos/"
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<base64>;base64)?,", re.I)
# Fields that change nothing here; anything else not listed below is refused rather than ignored.
IGNORED_FIELDS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
)
# Fields accepted only at the value that asks for nothing this service cannot do.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "seed": (None,),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
}
KNOWN_FIELDS = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "media_io_kwargs", "mm_processor_kwargs",
)  # fmt: skip
# Frame sampling a vLLM user sets per request, as this service names it.
SAMPLING_KEYS = {"num_frames": "num_frames", "fps": "fps"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, details=[{"field": param, "message": message}] if param else None)


@dataclass
class Medium:
    """One video or image of the chat, in order: a URL, a stored video's id, or bytes sent inline."""

    kind: str  # "video" or "image"
    url: str | None = None
    video_id: str | None = None
    data: bytes | None = None
    mime: str | None = None

    def as_input(self) -> dict[str, str]:
        return {"video_id": self.video_id} if self.video_id is not None else {"url": self.url or ""}


@dataclass
class ChatJob:
    """What the route needs: the job's JSON body (without media), its media in order, and how to answer."""

    body: dict[str, Any]
    videos: list[Medium] = field(default_factory=list)
    images: list[Medium] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def served_model_ids(settings: Settings) -> list[str]:
    """The model's name as VIDEOQA_MODEL gives it, then its last path segment as an alias."""
    name = settings.model.rstrip("/")
    alias = name.rsplit("/", 1)[-1]
    return [settings.model] + ([alias] if alias and alias != settings.model else [])


def check_model(model: object, settings: Settings) -> None:
    if not isinstance(model, str) or not model:
        raise bad("model is required: the name GET /v1/models lists", "model")
    if model not in served_model_ids(settings):
        raise NotFound(
            f"the model {model!r} does not exist; this service serves {settings.model!r}", code="model_not_found"
        )


def chat_job(body: object, settings: Settings) -> ChatJob:
    """``body`` checked and turned into a job; ``InvalidRequest`` (400) naming the parameter, or
    ``NotFound`` (404, ``model_not_found``) for a model this service does not serve."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    for name, value in body.items():
        if name in KNOWN_FIELDS or name in IGNORED_FIELDS:
            continue
        if name in NEUTRAL_VALUES:
            if value not in NEUTRAL_VALUES[name]:
                raise bad(f"{name} is not supported by this service", name)
            continue
        raise bad(f"unknown or unsupported parameter {name!r}", name)
    check_model(body.get("model"), settings)
    n = body.get("n")
    if n not in (None, 1):
        raise bad("n must be 1: this service answers one choice per request", "n")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise bad("stream_options may only hold include_usage", "stream_options")
    chat = ChatJob(body={}, stream=stream, include_usage=bool(stream and options and options.get("include_usage")))
    _messages(body.get("messages"), chat)
    chat.body["sampling"] = _sampling(body)
    chat.body["generation"] = _generation(body)
    return chat


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value not in (None, True, False):
        raise bad(f"{name} must be true or false", name)
    return bool(value)


def _messages(messages: object, chat: ChatJob) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    turns = [_turn(message, f"messages[{i}]", chat) for i, message in enumerate(messages)]
    last = len(turns) - 1
    role, media, question = turns[-1]
    if role != "user":
        raise bad("the last message must be the user's: this service answers the user's turn", f"messages[{last}]")
    if not question.strip():
        raise bad("the last user message needs some text: the question", f"messages[{last}].content")
    for i, (r, _, text) in enumerate(turns[:-1]):
        # In a job's history these place media: written as text, they would take media not theirs.
        if r == "user" and (VIDEO_PLACEHOLDER in text or IMAGE_PLACEHOLDER in text):
            raise bad(
                f"{VIDEO_PLACEHOLDER} and {IMAGE_PLACEHOLDER} cannot be written in the text of an earlier user "
                "message; send media as video_url and image_url parts",
                f"messages[{i}].content",
            )
    # An earlier turn's media stand before its text, as the chat template renders a turn.
    chat.body["history"] = [
        {"role": r, "content": f"{m}\n{text}" if m and text else m or text} for r, m, text in turns[:-1]
    ]
    chat.body["question"] = question
    placed = any(m for _, m, _ in turns[:-1])
    # Without media in earlier turns, the last turn's media are the job's own, as in a plain job
    # (videos, then images, first); a prompt of placeholders keeps any other order.
    if media and (placed or media != VIDEO_PLACEHOLDER * len(chat.videos) + IMAGE_PLACEHOLDER * len(chat.images)):
        chat.body["prompt"] = media


def _turn(message: object, where: str, chat: ChatJob) -> tuple[str, str, str]:
    """The message's role, its media as placeholders in order, and its text."""
    if not isinstance(message, dict):
        raise bad("each message must be an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"role {role!r} is not supported; use system, developer, user or assistant", f"{where}.role")
    unsupported = sorted(set(message) - {"role", "content", "name", "refusal", "tool_calls"})
    if unsupported or message.get("tool_calls"):
        name = unsupported[0] if unsupported else "tool_calls"
        raise bad(f"{name} is not supported in messages", f"{where}.{name}")
    content = message.get("content")
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise bad("content must be a string or a non-empty list of parts", f"{where}.content")
    texts: list[str] = []
    placeholders: list[str] = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content[{i}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url") and role == "user":
            medium = _medium(part, kind, at)
            (chat.videos if medium.kind == "video" else chat.images).append(medium)
            placeholders.append(VIDEO_PLACEHOLDER if medium.kind == "video" else IMAGE_PLACEHOLDER)
        elif kind in ("image_url", "video_url"):
            raise bad(f"{kind} parts are only read in user messages", f"{at}.type")
        else:
            raise bad(f"content part type {kind!r} is not supported; use text, image_url or video_url", f"{at}.type")
    text = "\n".join(texts)
    return ROLES[role], "".join(placeholders), text


def _medium(part: dict[str, Any], kind: str, at: str) -> Medium:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"{kind}.url is required", f"{at}.{kind}")
    media_kind = "video" if kind == "video_url" else "image"
    lowered = url.lower()
    if lowered.startswith(("http://", "https://", "s3://")):
        return Medium(media_kind, url=url)
    if lowered.startswith(STORED_VIDEO_URL):
        video_id = url[len(STORED_VIDEO_URL) :]
        if media_kind != "video" or not video_id or "/" in video_id:
            raise bad(f"{STORED_VIDEO_URL}<id> names a stored video, in a video_url part", f"{at}.{kind}.url")
        if "video_id" not in MediaInput.model_fields:
            raise bad(
                f"{STORED_VIDEO_URL} URLs name stored videos, which this service does not keep", f"{at}.{kind}.url"
            )
        return Medium(media_kind, video_id=video_id)
    if lowered.startswith("data:"):
        mime, data = _decode_data_url(url, f"{at}.{kind}.url")
        return Medium(media_kind, data=data, mime=mime)
    raise bad("media URLs must be http(s)://, s3://, data: or videoqa://videos/<id>", f"{at}.{kind}.url")


def _decode_data_url(url: str, param: str) -> tuple[str | None, bytes]:
    match = _DATA_URL.match(url)
    if match is None or not match.group("base64"):
        raise bad("a data: URL must be base64 (data:<type>;base64,<data>)", param)
    try:
        data = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data: URL's base64 cannot be decoded", param) from None
    if not data:
        raise bad("the data: URL holds no bytes", param)
    return match.group("mime"), data


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's per-request frame sampling: ``media_io_kwargs.video`` and ``mm_processor_kwargs``."""
    sampling: dict[str, Any] = {}
    io_kwargs = body.get("media_io_kwargs")
    if io_kwargs is not None:
        if not isinstance(io_kwargs, dict) or set(io_kwargs) - {"video", "image"}:
            raise bad("media_io_kwargs may hold video (num_frames, fps)", "media_io_kwargs")
        sampling |= _sampling_keys(io_kwargs.get("video") or {}, "media_io_kwargs.video")
    processor_kwargs = body.get("mm_processor_kwargs")
    if processor_kwargs is not None:
        for name, value in _sampling_keys(processor_kwargs, "mm_processor_kwargs").items():
            if name in sampling and sampling[name] != value:
                raise bad(f"{name} differs in media_io_kwargs and mm_processor_kwargs", f"mm_processor_kwargs.{name}")
            sampling[name] = value
    return sampling


def _sampling_keys(kwargs: object, param: str) -> dict[str, Any]:
    if not isinstance(kwargs, dict):
        raise bad(f"{param} must be an object", param)
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise bad(f"{param}.{unknown[0]} is not supported; use num_frames or fps", f"{param}.{unknown[0]}")
    return {SAMPLING_KEYS[name]: value for name, value in kwargs.items() if value is not None}


def _generation(body: dict[str, Any]) -> dict[str, Any]:
    generation: dict[str, Any] = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        generation["max_new_tokens"] = limit
    temperature, top_p = body.get("temperature"), body.get("top_p")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"{name} must be a number", name)
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad("temperature must be between 0 and 2", "temperature")
    # Greedy unless sampling is asked for: temperature 0 (or none) is greedy, as in a plain job.
    if temperature:
        generation.update(do_sample=True, temperature=float(temperature))
        if top_p is not None:
            generation["top_p"] = top_p
    elif top_p is not None and top_p != 1 and temperature is None:
        generation.update(do_sample=True, top_p=top_p)
    return generation
