"""Rendering a job with earlier turns (``history``) through the model's own chat template.

Every piece of text a user wrote (a turn's content, the question, the prompt) enters the template
as a random marker, which is then replaced by that text; the result records where the user's text
lies, so that it is tokenized as text (worker.prompt_ids) whatever it holds.

Where the media go (docs/conversations.md): without placeholders anywhere, all frames and images
come first in the job's own turn, as for a job without history. With placeholders, each user turn
takes the videos and images its ``<video>`` / ``<image>`` placeholders name, in order across the
history and then the prompt. The placeholders a turn starts with are given to the template as the
turn's images, which it renders before the text (one newline after them is the template's own, so
``"<video>\\nWhat is it?"`` renders exactly as ``[video, "What is it?"]``); placeholders further in
are expanded in place, since the template cannot put an image inside text.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

from PIL import Image

from common.errors import InvalidRequest
from common.schemas import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, StoredRequest, places_media
from worker.gpu.prompt_ids import Span

Segment = tuple[str, bool]  # a run of text, and whether the user wrote it


class _Media:
    """The job's media handed out in placeholder order, and the images in the order they appear."""

    def __init__(self, video_frames: list[list[Image.Image]], images: list[Image.Image], image_token: str) -> None:
        self._videos: Iterator[list[Image.Image]] = iter(video_frames)
        self._stills: Iterator[Image.Image] = iter(images)
        self.image_token = image_token
        self.ordered: list[Image.Image] = []

    def take(self, placeholder: str) -> list[Image.Image]:
        try:
            taken = next(self._videos) if placeholder == VIDEO_PLACEHOLDER else [next(self._stills)]
        except StopIteration:
            # The API refuses such a request; a record written otherwise fails alone, clearly.
            raise InvalidRequest(f"more {placeholder} placeholders than the job has media") from None
        self.ordered.extend(taken)
        return taken


class _Markers:
    """Text parts of the template's messages, each a marker standing for segments."""

    def __init__(self) -> None:
        self.fills: dict[str, list[Segment]] = {}

    def part(self, segments: list[Segment]) -> dict[str, str]:
        marker = f"<{uuid.uuid4().hex}>"
        self.fills[marker] = segments
        return {"type": "text", "text": marker}


def _leading_placeholders(text: str) -> tuple[list[str], str]:
    found: list[str] = []
    rest = text
    while rest.startswith((VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)):
        placeholder = VIDEO_PLACEHOLDER if rest.startswith(VIDEO_PLACEHOLDER) else IMAGE_PLACEHOLDER
        found.append(placeholder)
        rest = rest[len(placeholder) :]
    if found and rest.startswith("\n"):
        rest = rest[1:]  # the template writes this newline itself, between the images and the text
    return found, rest


def _expanded(text: str, media: _Media) -> list[Segment]:
    """``text`` with each placeholder replaced by its media's image tokens (ours, not the user's)."""
    segments: list[Segment] = []
    pattern = re.compile(f"{re.escape(VIDEO_PLACEHOLDER)}|{re.escape(IMAGE_PLACEHOLDER)}")
    start = 0
    for match in pattern.finditer(text):
        segments.append((text[start : match.start()], True))
        segments.append((media.image_token * len(media.take(match.group())), False))
        start = match.end()
    segments.append((text[start:], True))
    return segments


def _user_message(text: str, media: _Media, markers: _Markers, literal_tail: str = "") -> dict[str, Any]:
    """A user turn whose ``text`` holds placeholders; ``literal_tail`` (the question) holds none."""
    leading, rest = _leading_placeholders(text)
    content: list[dict[str, str]] = [{"type": "image"} for placeholder in leading for _ in media.take(placeholder)]
    segments = _expanded(rest, media) if rest else []
    if literal_tail:
        segments += ([("\n", False)] if rest else []) + [(literal_tail, True)]
    if segments:
        content.append(markers.part(segments))
    return {"role": "user", "content": content}


def render_conversation(
    processor: Any, request: StoredRequest, video_frames: list[list[Image.Image]], images: list[Image.Image]
) -> tuple[str, list[Image.Image], tuple[Span, ...]]:
    """The rendered text, its images in the order of their tokens, and the spans of user text."""
    media = _Media(video_frames, images, processor.image_token)
    markers = _Markers()
    messages: list[dict[str, Any]] = []
    placed = places_media(request.prompt, request.history)
    for turn in request.history:
        if turn.role == "user" and placed:
            messages.append(_user_message(turn.content, media, markers))
        else:
            messages.append({"role": turn.role, "content": [markers.part([(turn.content, True)])]})
    if not placed:
        # As a job without history: every frame, then every image, then the question.
        for placeholder in [VIDEO_PLACEHOLDER] * len(video_frames) + [IMAGE_PLACEHOLDER] * len(images):
            media.take(placeholder)
        content = [{"type": "image"} for _ in media.ordered]
        messages.append({"role": "user", "content": [*content, markers.part([(request.question, True)])]})
    else:
        messages.append(_user_message(request.prompt or "", media, markers, literal_tail=request.question))
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text, spans = _filled(rendered, markers)
    return text, media.ordered, spans


def _filled(rendered: str, markers: _Markers) -> tuple[str, tuple[Span, ...]]:
    pieces: list[str] = []
    spans: list[Span] = []
    length = 0
    start = 0
    pattern = re.compile("|".join(re.escape(marker) for marker in markers.fills))
    seen: list[str] = []
    for match in pattern.finditer(rendered):
        pieces.append(rendered[start : match.start()])
        length += match.start() - start
        for text, by_user in markers.fills[match.group()]:
            if by_user and text:
                spans.append((length, length + len(text)))
            pieces.append(text)
            length += len(text)
        seen.append(match.group())
        start = match.end()
    if sorted(seen) != sorted(markers.fills):
        raise ValueError("the chat template does not render each turn's text exactly once")
    pieces.append(rendered[start:])
    return "".join(pieces), tuple(spans)
