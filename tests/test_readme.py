"""Every Quick start snippet runs against the running service."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.client import APIError, Client
from common.client.sse import parse_sse
from tests.conftest import WEBHOOK_SECRET, RunningService
from worker.cli.stack import free_port

README = Path(__file__).parent.parent / "README.md"
QUICK_START_URL = "http://127.0.0.1:8000"
BIN = Path(sys.executable).parent


def quick_start() -> dict[str, list[str]]:
    """The code blocks of each ``###`` part of the Quick start, in order."""
    text = README.read_text()
    section = text[text.index("## Quick start\n") :]
    section = section[: section.index("\n## ", 1)]
    parts: dict[str, list[str]] = {}
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        parts[title.strip()] = re.findall(r"^```(?:bash|python)\n(.*?)^```", body, flags=re.M | re.S)
    return parts


@pytest.fixture()
def workdir(tmp_path: Path, sample_videos: list[Path]) -> Path:
    """Where a user stands after the Quick start's first commands: the sample videos in videos/."""
    (tmp_path / "videos").mkdir()
    for path in sample_videos:
        shutil.copy(path, tmp_path / "videos" / path.name)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOQA_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "VIDEOQA_WEBHOOK_SECRET": WEBHOOK_SECRET}


def _run(snippet: str, language: str, service: RunningService, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``snippet`` as a user runs it, with the service's address for the one it assumes."""
    code = snippet.replace(QUICK_START_URL, service.base_url)
    argv = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    env = {**_env(), "VIDEOQA_SERVER": service.base_url}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _job_with_events_route(service: RunningService, sample_videos: list[Path]) -> None:
    client = Client(service.base_url)
    job = client.submit(
        [sample_videos[0]], "Is there a route?", sampling={"num_frames": 1}, generation={"max_new_tokens": 1}
    )
    status = client._session.get(service.url(f"/v1/jobs/{job.id}/events"), stream=True, timeout=30).status_code
    if status == 404:
        pytest.skip("this service has no GET /v1/jobs/{id}/events yet")


def test_the_parts_are_there() -> None:
    assert list(quick_start()) == [
        "Keep the service running",
        "Ask from the command line",
        "Ask with curl",
        "Ask from Python",
        "Receive a webhook",
        "Watch events",
    ]


@pytest.mark.service
def test_keep_the_service_running() -> None:
    (command,) = quick_start()["Keep the service running"]
    assert command.split("#")[0].split() == ["videoqa", "up", "--tiny"]
    helped = subprocess.run(
        [str(BIN / "videoqa"), "up", "--help"], env=_env(), capture_output=True, text=True, timeout=60
    )
    if "--tiny" not in helped.stdout:
        pytest.skip("videoqa up has no --tiny yet")


def test_ask_from_the_command_line(service: RunningService, tmp_path: Path) -> None:
    (snippet,) = quick_start()["Ask from the command line"]
    out = _run(snippet, "bash", service, tmp_path).stdout
    assert "Answer: " in out and "  video 1, frame 100 at 3.33 s" in out


def test_ask_with_curl(service: RunningService, workdir: Path) -> None:
    (snippet,) = quick_start()["Ask with curl"]
    record = json.loads(_run(snippet, "bash", service, workdir).stdout)
    assert record["request"]["sampling"]["num_frames"] == 6
    assert Client(service.base_url).wait(record["id"], timeout=240).status == "succeeded"


def test_ask_from_python(service: RunningService, workdir: Path) -> None:
    (snippet,) = quick_start()["Ask from Python"]
    lines = _run(snippet, "python", service, workdir).stdout.splitlines()
    assert lines[-12:] == [f"video {v}, frame {i} at {i / 30:.2f} s" for v in (0, 1) for i in range(0, 120, 20)]


def _listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_receive_a_webhook(service: RunningService, workdir: Path) -> None:
    # A request refused for its missing video creates no job; one without webhooks names the field.
    with pytest.raises(APIError) as refused:
        Client(service.base_url).submit([], "Hooked?", webhook="http://127.0.0.1:9/hook")
    if "webhook" in refused.value.message:
        pytest.skip(f"this service takes no webhooks yet: {refused.value.message}")
    receiver, submit = quick_start()["Receive a webhook"]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", receiver.replace("9000", str(port))],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,  # stderr: its access log
    )  # fmt: skip
    try:
        _listening(port)
        job_id = _run(submit.replace("9000", str(port)), "python", service, workdir).stdout.split()[-1]
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in process.stdout or ():
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        line = lines.get(timeout=240)
        verdict, _, body = line.partition(" ")
        assert verdict == "verified", line
        assert json.loads(body)["id"] == job_id
    finally:
        process.terminate()
        process.wait(10)


def test_watch_events(service: RunningService, workdir: Path, sample_videos: list[Path]) -> None:
    _job_with_events_route(service, sample_videos)
    (snippet,) = quick_start()["Watch events"]
    out = _run(snippet, "bash", service, workdir).stdout
    events = list(parse_sse([out.encode()]))
    assert events[0].event == "status" and events[-1].event == "done"
    answer = json.loads(events[-1].data)["result"]["answer"]
    assert "".join(json.loads(e.data)["text"] for e in events if e.event == "token") == answer


@pytest.mark.service
def test_the_webhook_receiver_tells_signed_from_forged() -> None:
    # Signed here by the contract's scheme, so the snippet is checked before a service sends any.
    import base64
    import hashlib
    import hmac

    import requests

    receiver, _ = quick_start()["Receive a webhook"]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", receiver.replace("9000", str(port))],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,  # stderr: its access log
    )  # fmt: skip
    try:
        _listening(port)
        key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
        body, stamp = b'{"id": "j1", "status": "succeeded"}', str(int(time.time()))
        mac = hmac.new(key, b"msg_1." + stamp.encode() + b"." + body, hashlib.sha256).digest()
        signed = "v1," + base64.b64encode(mac).decode()
        for signature in (f"v1,bm90IGl0 {signed}", "v1,bm90IGl0"):
            headers = {"webhook-id": "msg_1", "webhook-timestamp": stamp, "webhook-signature": signature}
            requests.post(f"http://127.0.0.1:{port}/hook", data=body, headers=headers, timeout=10)
        assert process.stdout is not None
        assert [process.stdout.readline().split()[0] for _ in range(2)] == ["verified", "forged"]
    finally:
        process.terminate()
        process.wait(10)
