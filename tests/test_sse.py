"""The event-stream parser on real bytes, cut into chunks at every possible place."""

from __future__ import annotations

import pytest

from common.client.sse import SSEMessage, parse_sse

STREAM = (
    b": keep-alive\r\n"
    b"id: 1\r\n"
    b"event: status\r\n"
    b'data: {"id": "j", "status": "queued"}\r\n'
    b"\r\n"
    b"id: 2\n"
    b"event: token\n"
    b'data: {"text": "caf\xc3\xa9 "}\n'
    b"\n"
    b"id: 3\r"
    b"event: token\r"
    b"data:first\r"
    b"data: second\r"
    b"\r"
    b"event: ignored-without-data\n"
    b"\n"
    b"id: 4\n"
    b"event: done\n"
    b"data\n"
    b"\n"
    b"id: 5\n"
    b"data: cut off before its blank line\n"
)
EXPECTED = [
    SSEMessage("status", '{"id": "j", "status": "queued"}', "1"),
    SSEMessage("token", '{"text": "café "}', "2"),
    SSEMessage("token", "first\nsecond", "3"),
    SSEMessage("done", "", "4"),
]


def test_one_chunk() -> None:
    assert list(parse_sse([STREAM])) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_two_chunks(cut: int) -> None:
    # A CR LF split over two chunks is one line end, not two (which would end an event early).
    assert list(parse_sse([STREAM[:cut], STREAM[cut:]])) == EXPECTED


def test_byte_by_byte() -> None:
    assert list(parse_sse(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


def test_default_event_name_and_id_kept_across_messages() -> None:
    messages = list(parse_sse([b"id: 7\ndata: a\n\ndata: b\n\n"]))
    assert messages == [SSEMessage("message", "a", "7"), SSEMessage("message", "b", "7")]
