"""The client against servers that lack a feature or drop a connection.

The service always has these routes once it has them, so a server without them, or one whose
stream breaks off halfway, is played by a small stand-in HTTP server here: the only way to show
the client's behaviour with older servers and broken connections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from common.client import APIError, Client, EventsUnavailable

RECORD = {"id": "j1", "status": "queued", "created_at": 1.0, "updated_at": 1.0, "result": None, "error": None}
FRAMES = [{"video": 0, "index": 0, "time": 0.0}, {"video": 0, "index": 45, "time": 1.5}]
DONE = {**RECORD, "status": "succeeded", "result": {"answer": "ab", "model": "m", "frames": FRAMES, "usage": {}}}


class StandIn(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []
    url: ClassVar[str] = ""  # the stand-in's address, once it listens
    events_route = True
    polls_until_done = 2

    def log_message(self, *_: Any) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._json(202, RECORD)

    def do_GET(self) -> None:
        self.seen.append((self.path, dict(self.headers)))
        if self.path.startswith("/v1/jobs/j1/events") and self.events_route:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if self.headers.get("Last-Event-ID") is None:
                # Two events, then the connection drops before the job ends.
                status = json.dumps(RECORD)
                self.wfile.write(f"id: 1\nevent: status\ndata: {status}\n\nid: 2\nevent: token\ndata: ".encode())
                self.wfile.write(b'{"text": "a"}\n\n')
            else:
                done = json.dumps(DONE)
                self.wfile.write(
                    f'id: 3\nevent: token\ndata: {{"text": "b"}}\n\nid: 4\nevent: done\ndata: {done}\n\n'.encode()
                )
        elif self.path.startswith("/v1/jobs/j1"):
            polls = sum(1 for path, _ in self.seen if path.startswith("/v1/jobs/j1?"))
            self._json(200, DONE if polls > self.polls_until_done else RECORD)
        else:
            self._json(404, {"error": {"code": "not_found", "message": "no such thing"}})


@pytest.fixture()
def stand_in() -> Iterator[type[StandIn]]:
    handler: type[StandIn] = type("Handler", (StandIn,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()


def test_events_resume_after_a_dropped_connection(stand_in: type[StandIn]) -> None:
    events = list(Client(stand_in.url).events("j1"))
    assert [(e.id, e.event) for e in events] == [("1", "status"), ("2", "token"), ("3", "token"), ("4", "done")]
    assert "".join(e.text for e in events) == "ab"
    assert events[0].job is not None and events[0].job.status == "queued"
    assert events[-1].job is not None and events[-1].job.result is not None
    streams = [headers for path, headers in stand_in.seen if path.endswith("/events")]
    assert [headers.get("Last-Event-ID") for headers in streams] == [None, "2"]


def test_events_on_a_server_without_them_is_a_clear_error(stand_in: type[StandIn]) -> None:
    stand_in.events_route = False
    client = Client(stand_in.url)
    with pytest.raises(EventsUnavailable) as missing:
        next(client.events("j1"))
    assert missing.value.code == "events_unavailable" and "wait()" in missing.value.message
    # An unknown job is still an unknown job, not a missing feature.
    with pytest.raises(APIError) as unknown:
        next(client.events("nope"))
    assert not isinstance(unknown.value, EventsUnavailable) and unknown.value.code == "not_found"


def test_wait_polls_a_server_that_answers_at_once(stand_in: type[StandIn]) -> None:
    job = Client(stand_in.url).wait("j1", timeout=60, poll_interval=0.05)
    assert job.status == "succeeded" and job.result is not None and job.result.answer == "ab"
    polls = [path for path, _ in stand_in.seen if path.startswith("/v1/jobs/j1?")]
    # Each request asked the server to hold it; this one answered at once, so the client asked again.
    assert len(polls) == 3 and all("wait=" in path for path in polls)


@pytest.mark.service
def test_videoqa_ask_streams_the_answer_as_it_comes(stand_in: type[StandIn]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOQA_")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("videoqa")), "ask", "https://example.com/a.mp4", "-q", "What?",
         "--server", stand_in.url],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Answer: ab",
        "Frames:",
        "  video 0, frame 0 at 0.00 s",
        "  video 0, frame 45 at 1.50 s",
    ]
    # Progress stops once the answer is being written, so that the two never interleave.
    assert "job j1: queued" in done.stderr and "succeeded" not in done.stderr


@pytest.mark.service
def test_videoqa_ask_on_a_terminal_shows_a_spinner(stand_in: type[StandIn]) -> None:
    import pty

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOQA_")}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("videoqa")), "ask", "https://example.com/a.mp4", "-q", "What?",
         "--server", stand_in.url],
        env=env, stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = screen.decode()
    assert "\x1b[?25l" in text  # rich hid the cursor for its spinner, and showed it again
    assert "\x1b[?25h" in text
    assert "Answer: ab\r\nFrames:\r\n  video 0, frame 0 at 0.00 s\r\n" in text
