"""The web page at ``/``, used as a person would, in a real browser (``tests/browser.py``: Debian's
headless Chromium through its chromedriver) against the running service: gunicorn, a CPU worker
and a GPU worker on the tiny model, over Redis and moto's S3 server.

Screenshots of the page (desktop, and 375 px wide as on a phone) are written to the folder named
by ``VIDEOQA_TEST_ARTIFACTS`` when it is set, else to each test's ``tmp_path``.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.keys import Keys

from common.api_keys import hash_key
from tests.browser import PHONE, Browser, launch
from tests.conftest import RunningService, service_env, start_process
from worker.cli.stack import Stack, api_command, cpu_worker_command, free_port, gpu_worker_command, wait_for_http

LIFECYCLE = ["queued", "ingesting", "queued_gpu", "generating", "succeeded"]
KEY, OTHER_KEY = "vqa_page_alice_key", "vqa_page_bob_key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ["VIDEOQA_TEST_ARTIFACTS"]) if os.environ.get("VIDEOQA_TEST_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ask(browser: Browser, video: Path | str, question: str, *, frames: int = 3, tokens: int = 12) -> str:
    """Choose the file ``video`` (or paste it, a URL), type the question and options, press Ask;
    the new job's id."""
    previous = browser.text("#job-id")
    if isinstance(video, Path):
        browser.find("#files").send_keys(str(video))
        browser.wait(lambda: video.name in browser.text("#file-list"), "the chosen file to be listed")
    else:
        browser.type("#urls", video)
    browser.type("#question", question)
    browser.type("#num-frames", str(frames))
    browser.type("#max-new-tokens", str(tokens))
    browser.find("#submit").click()
    browser.wait(lambda: browser.text("#job-id") not in ("", previous), "the submitted job to be shown")
    return browser.text("#job-id")


def wait_for_answer(browser: Browser, job_id: str) -> str:
    final = f'.turn[data-job="{job_id}"] .answer.final'
    browser.wait(lambda: browser.visible(final), f"job {job_id}'s answer")
    return browser.text(final)


def reached_stages(browser: Browser) -> list[str]:
    return list(browser.js("return [...document.querySelectorAll('#stages li.reached')].map(li => li.dataset.stage)"))


def loaded_thumbnails(browser: Browser, count: int) -> list[dict[str, object]]:
    """Waits until ``count`` thumbnails have decoded; each one's source, width and caption."""
    script = """return [...document.querySelectorAll('#frames figure')].map(f => ({
        src: f.querySelector('img').src, complete: f.querySelector('img').complete,
        width: f.querySelector('img').naturalWidth, caption: f.querySelector('figcaption').textContent}))"""
    browser.wait(
        lambda: len(shown := browser.js(script)) == count and all(t["complete"] and t["width"] > 0 for t in shown),
        f"{count} thumbnails to load",
    )
    return list(browser.js(script))


def skipped_stages(browser: Browser) -> list[str]:
    return list(browser.js("return [...document.querySelectorAll('#stages li.skipped')].map(li => li.dataset.stage)"))


def shown_conversation(browser: Browser) -> list[list[str]]:
    """Each turn shown, oldest first: its question and its answer."""
    script = """return [...document.querySelectorAll('#turns .turn')].map(t =>
        [t.querySelector('.question .text').textContent, t.querySelector('.answer').textContent])"""
    return [list(turn) for turn in browser.js(script)]


def assert_fits(browser: Browser, width: int) -> None:
    overflow = browser.js("const d = document.documentElement; return [d.scrollWidth, d.clientWidth, innerWidth]")
    assert overflow[0] <= overflow[1] == width, f"horizontal scroll at {width} px: {overflow}"


def assert_no_policy_violation(browser: Browser) -> None:
    errors = browser.console_errors()
    assert not [e for e in errors if "Content Security Policy" in e or "Refused to" in e], errors


def test_a_person_asks_about_a_video_and_watches_the_answer_arrive(
    service: RunningService, sample_videos: list[Path], browser: Browser, artifacts: Path
) -> None:
    browser.open(service.url("/"))
    browser.wait(lambda: browser.visible("#jobs-title"), "the page")
    assert not browser.visible("#auth"), "authentication is off: no key is asked for"
    job_id = ask(browser, sample_videos[0], "What is the cat doing?", frames=3, tokens=12)
    shown = wait_for_answer(browser, job_id)

    job = requests.get(service.url(f"/v1/jobs/{job_id}"), timeout=10).json()
    assert job["status"] == "succeeded", job
    assert shown == job["result"]["answer"] and shown
    assert reached_stages(browser) == LIFECYCLE
    frames = job["result"]["frames"]
    thumbnails = loaded_thumbnails(browser, len(frames))
    assert [t["caption"] for t in thumbnails] == [f"{frame['time']:.2f} s" for frame in frames]
    assert all(str(t["src"]).startswith("blob:") for t in thumbnails)
    browser.wait(lambda: browser.visible(f'#jobs button[data-job="{job_id}"] .badge.succeeded'), "the job in the list")
    assert browser.text(f'#jobs button[data-job="{job_id}"] .q') == "What is the cat doing?"
    assert_no_policy_violation(browser)
    assert browser.accessibility_problems() == []
    order = browser.tab_order(12)
    expected = ["files", "urls", "question", "num-frames", "max-new-tokens", "submit", "refresh-jobs", job_id]
    assert [name for name in order if name in expected] == expected, order
    browser.screenshot(artifacts / "page-desktop.png")

    # A follow-up goes as {"parent", "question"}: the same frames, the earlier turn above its own.
    browser.type("#followup", "And then?")
    browser.find("#followup-submit").click()
    browser.wait(lambda: browser.text("#job-id") != job_id, "the follow-up job")
    follow_up = browser.text("#job-id")
    # Its frames are its parent's: shown as soon as it is (its own record lists them only at the end).
    assert browser.js("return document.querySelectorAll('#frames figure').length") == len(frames)
    follow_up_answer = wait_for_answer(browser, follow_up)
    follow_up_job = requests.get(service.url(f"/v1/jobs/{follow_up}"), timeout=10).json()
    assert follow_up_job["status"] == "succeeded", follow_up_job
    assert follow_up_answer == follow_up_job["result"]["answer"]
    assert follow_up_job["request"]["parent"] == job_id
    assert follow_up_job["request"]["generation"]["max_new_tokens"] == 12  # as long as the question it follows
    assert follow_up_job["result"]["frames"] == frames
    # No CPU stage ran for it: nothing fetched, decoded or stored; it started waiting for a GPU.
    assert "ingest" not in follow_up_job["stages"], follow_up_job["stages"]
    assert not {"download", "decode", "store_frames", "ingest"} & set(follow_up_job["result"]["timings"])
    assert reached_stages(browser) == ["queued_gpu", "generating", "succeeded"]
    assert skipped_stages(browser) == ["queued", "ingesting"]
    conversation = [["What is the cat doing?", shown], ["And then?", follow_up_answer]]
    assert shown_conversation(browser) == conversation
    assert job_id in browser.text("#job-parent")
    assert [t["caption"] for t in loaded_thumbnails(browser, len(frames))] == [t["caption"] for t in thumbnails]
    assert_no_policy_violation(browser)
    assert browser.accessibility_problems() == []
    browser.screenshot(artifacts / "page-follow-up.png")

    # Another job, then the first one again from the list: its events replay from the start.
    second = ask(browser, sample_videos[1], "Which colours?", frames=2, tokens=8)
    wait_for_answer(browser, second)
    assert len(shown_conversation(browser)) == 1  # a new question starts a new conversation
    browser.find(f'#jobs button[data-job="{job_id}"]').send_keys(Keys.ENTER)  # from the keyboard
    browser.wait(lambda: browser.text("#job-id") == job_id, "the picked job")
    assert wait_for_answer(browser, job_id) == job["result"]["answer"]
    assert reached_stages(browser) == LIFECYCLE
    loaded_thumbnails(browser, len(frames))

    # The follow-up from the list: its whole conversation again, from its record's history.
    browser.find(f'#jobs button[data-job="{follow_up}"]').click()
    browser.wait(lambda: browser.text("#job-id") == follow_up, "the picked follow-up")
    assert wait_for_answer(browser, follow_up) == follow_up_answer
    assert shown_conversation(browser) == conversation
    assert skipped_stages(browser) == ["queued", "ingesting"]
    loaded_thumbnails(browser, len(frames))

    browser.resize(PHONE)
    browser.wait(lambda: browser.js("return innerWidth") == PHONE[0], "the phone-width viewport")
    assert_fits(browser, PHONE[0])
    assert browser.accessibility_problems() == []
    browser.screenshot(artifacts / "page-375px.png")


@pytest.fixture()
def file_server(sample_videos: list[Path]) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(sample_videos[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def keyed_service(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[RunningService]:
    """API keys on; the API and a CPU worker, without a GPU worker until the test starts one,
    so a job waits in ``queued_gpu`` for as long as the test needs."""
    env = service_env(
        spare_redis_url, aws_env, tiny_model_dir,
        VIDEOQA_API_KEYS=f"alice:{hash_key(KEY)},bob:{hash_key(OTHER_KEY)}",
    )  # fmt: skip
    stack = Stack(env=env)
    port = free_port()
    start_process(stack, tmp_path, "api", api_command(port=port, workers=1))
    start_process(stack, tmp_path, "cpu", cpu_worker_command(concurrency=1))
    running = RunningService(f"http://127.0.0.1:{port}", env, stack, tmp_path)
    try:
        wait_for_http(running.url("/healthz"), timeout_s=120)
        yield running
    finally:
        stack.stop()


def test_with_keys_the_page_asks_for_one_refuses_a_wrong_one_and_cancels_and_answers(
    keyed_service: RunningService, sample_videos: list[Path], file_server: str, browser: Browser, artifacts: Path
) -> None:
    service = keyed_service
    browser.open(service.url("/"))
    browser.wait(lambda: browser.visible("#auth"), "the API key form")
    browser.wait(lambda: "Enter an API key" in browser.text("#key-status"), "the request for a key")

    browser.type("#api-key", "not-a-key")
    browser.find("#key-form button[type=submit]").click()
    browser.wait(lambda: "refused this key" in browser.text("#key-status"), "the wrong key's error")
    assert "unknown API key" in browser.text("#key-status")
    assert browser.find("#api-key").get_attribute("aria-invalid") == "true"
    assert browser.accessibility_problems() == []
    browser.screenshot(artifacts / "page-wrong-key.png")

    browser.type("#api-key", KEY)
    browser.find("#key-form button[type=submit]").click()
    browser.wait(lambda: browser.text("#key-status") == "Key accepted.", "the key to be accepted")
    assert browser.js("return sessionStorage.getItem('videoqa.apiKey')") == KEY
    browser.driver.refresh()  # kept for this tab: the list loads without asking again
    browser.wait(lambda: browser.text("#key-status") == "" and browser.visible("#jobs-empty"), "the empty list")

    # A pasted URL goes as JSON. No GPU worker yet: the job waits in queued_gpu until cancelled.
    url = f"{file_server}/{sample_videos[0].name}"
    waiting = ask(browser, url, "Will this run?")
    browser.wait(lambda: "queued_gpu" in reached_stages(browser), "the job to wait for a GPU")
    browser.find("#cancel").click()
    browser.wait(lambda: "cancelled" in reached_stages(browser), "the cancellation")
    assert "cancelled" in browser.text("#job-error")
    assert not browser.visible("#cancel")
    alice = {"Authorization": f"Bearer {KEY}"}
    cancelled = requests.get(service.url(f"/v1/jobs/{waiting}"), headers=alice, timeout=10).json()
    assert cancelled["status"] == "cancelled"
    assert [video["location"] for video in cancelled["request"]["videos"]] == [url]
    assert cancelled["request"]["sampling"]["num_frames"] == 3

    start_process(service.stack, service.logs, "gpu", gpu_worker_command())
    job_id = ask(browser, sample_videos[1], "What moves?", frames=2, tokens=10)
    shown = wait_for_answer(browser, job_id)
    job = requests.get(service.url(f"/v1/jobs/{job_id}"), headers=alice, timeout=10).json()
    assert shown == job["result"]["answer"]
    assert reached_stages(browser) == LIFECYCLE
    thumbnails = loaded_thumbnails(browser, len(job["result"]["frames"]))
    assert all(str(t["src"]).startswith("blob:") for t in thumbnails)  # fetched with the key
    # The key went in a header only: no URL the page requested carries it.
    urls = browser.js("return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")
    assert urls and not [url for url in urls if KEY in url]
    assert_no_policy_violation(browser)

    # The frames route checks the key and the tenant as the job's own route does.
    frame = requests.get(service.url(f"/v1/jobs/{job_id}/frames/0"), headers=alice, timeout=10)
    assert frame.status_code == 200 and frame.headers["Content-Type"] == "image/png"
    assert frame.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert frame.headers["Cache-Control"].startswith("private")
    assert requests.get(service.url(f"/v1/jobs/{job_id}/frames/0"), timeout=10).status_code == 401
    bob = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert requests.get(service.url(f"/v1/jobs/{job_id}/frames/0"), headers=bob, timeout=10).status_code == 404
    past = requests.get(service.url(f"/v1/jobs/{job_id}/frames/{len(thumbnails)}"), headers=alice, timeout=10)
    assert past.status_code == 404 and f"has {len(thumbnails)} frames" in past.json()["error"]["message"]

    browser.resize(PHONE)
    browser.wait(lambda: browser.js("return innerWidth") == PHONE[0], "the phone-width viewport")
    assert_fits(browser, PHONE[0])
    assert browser.accessibility_problems() == []
    browser.screenshot(artifacts / "page-keyed-375px.png")

    browser.find("#forget-key").click()
    browser.wait(lambda: "Enter an API key" in browser.text("#key-status"), "the key to be forgotten")
    assert browser.js("return sessionStorage.getItem('videoqa.apiKey')") is None
    assert browser.js("return document.querySelectorAll('#jobs li').length") == 0
