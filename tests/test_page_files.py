"""The web page's files as served (a strict policy, nothing from elsewhere, shipped in the wheel)
and the route its thumbnails use, through ``create_app`` with real Redis and a local store."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from flask import Flask

from api.app import create_app
from api.page import ASSETS, CONTENT_SECURITY_POLICY, STATIC_DIR
from common.jobs import JobStatus
from common.settings import Settings

ROOT = Path(__file__).parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + b"frame bytes"


@pytest.fixture()
def app(local_settings: Settings) -> Flask:
    return create_app(local_settings)


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.urls += [value for name, value in attrs if name in ("src", "href", "action") and value]
        if "style" in values or any(name.startswith("on") for name in values):
            self.inline.append(tag)

    def handle_data(self, data: str) -> None:
        if self.lasttag in ("script", "style") and data.strip():
            self.inline.append(self.lasttag)


def test_the_page_is_served_with_a_strict_policy_and_needs_nothing_from_elsewhere(app: Flask) -> None:
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert policy == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy and "http" not in policy
    parser = _References()
    parser.feed(page.get_data(as_text=True))
    assert parser.inline == [], "the policy refuses inline script and style"
    local = [url for url in parser.urls if url.startswith("#") or re.match(r"/[^/]", url)]
    assert parser.urls == local, parser.urls  # no CDN, no web font, no other host
    for url in local:
        assert url.startswith("#") or client.get(url).status_code == 200, url
    for name, mimetype in ASSETS.items():
        served = client.get(f"/assets/{name}")
        assert served.status_code == 200 and served.mimetype == mimetype
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        text = served.get_data(as_text=True)
        if name.endswith(".js"):
            imports = re.findall(r"""^import .* from "([^"]+)";$""", text, flags=re.M)
            assert all(module.startswith("./") for module in imports), imports
            assert "innerHTML" not in text, "text from the service is set as text only"
        if name.endswith(".css"):
            assert "@import" not in text and "url(" not in text
    # Only the listed files: nothing else of the package is reachable.
    for name in ("index.html", "../page.py", "..%2Fpage.py", "app.py"):
        refused = client.get(f"/assets/{name}")
        assert refused.status_code == 404 and refused.get_json()["error"]["code"] == "not_found", name


@pytest.mark.service  # runs a command
def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("api", "common", "worker"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("videoqa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"api/static/{name}" for name in [*ASSETS, "index.html"]}
    assert expected <= names, expected - names
    assert {path.name for path in STATIC_DIR.iterdir()} == {*ASSETS, "index.html"}


def _ingested_job(app: Flask, frames: int) -> tuple[str, list[str]]:
    """A job as the CPU worker leaves it: ``frames`` frames of one video in the store."""
    services = app.extensions["videoqa"]
    job = services.jobs.create({"question": "What?"})
    keys = [f"frames/test/{job.id}/{n}.png" for n in range(frames)]
    for n, key in enumerate(keys):
        services.store.put_bytes(key, PNG + bytes([n]), content_type="image/png")
    media = [
        {"kind": "video", "position": 0, "frames": [{"index": n, "time": n / 2, "key": k} for n, k in enumerate(keys)]}
    ]
    assert services.jobs.transition(job.id, JobStatus.INGESTING, allowed_from={JobStatus.QUEUED})
    assert services.jobs.transition(job.id, JobStatus.QUEUED_GPU, allowed_from={JobStatus.INGESTING}, media=media)
    return job.id, keys


def test_a_jobs_frames_are_served_by_number_with_clear_refusals(app: Flask) -> None:
    client = app.test_client()
    services = app.extensions["videoqa"]
    waiting = services.jobs.create({"question": "Not yet?"})
    early = client.get(f"/v1/jobs/{waiting.id}/frames/0")
    assert early.status_code == 404 and "no frames yet" in early.get_json()["error"]["message"]

    job_id, keys = _ingested_job(app, 2)
    for n in range(2):
        frame = client.get(f"/v1/jobs/{job_id}/frames/{n}")
        assert frame.status_code == 200 and frame.mimetype == "image/png"
        assert frame.data == PNG + bytes([n])
        assert frame.headers["Cache-Control"] == "private, max-age=3600"
    past = client.get(f"/v1/jobs/{job_id}/frames/2")
    assert (
        past.status_code == 404 and past.get_json()["error"]["message"] == f"job {job_id} has 2 frames, numbered from 0"
    )
    for bad in ("x", "-1", "1.5", "²", "9" * 7):
        refused = client.get(f"/v1/jobs/{job_id}/frames/{bad}")
        assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "invalid_request", bad
    assert client.get("/v1/jobs/nope/frames/0").status_code == 404

    services.store.delete([keys[1]])
    gone = client.get(f"/v1/jobs/{job_id}/frames/1")
    message = gone.get_json()["error"]["message"]
    assert gone.status_code == 404 and "no longer stored" in message and keys[1] not in message
