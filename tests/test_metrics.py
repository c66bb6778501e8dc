"""``GET /metrics`` through the gunicorn API: counters and histograms move with real jobs, and
every API process reports the same values (they come from Redis)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from common.metrics import STAGES, queue_keys
from common.settings import Settings
from tests.conftest import RunningService
from worker.fixtures.synthetic_videos import write_cat_video

Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(service: RunningService) -> Samples:
    response = requests.get(service.url("/metrics"), timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _submit(service: RunningService, **kwargs: object) -> str:
    response = requests.post(service.url("/v1/jobs"), timeout=30, **kwargs)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_counters_and_histograms_move_after_jobs(
    service: RunningService, sample_videos: list[Path], tmp_path: Path
) -> None:
    # A video of its own: frames another test stored would be reused, with no decode to measure.
    video = write_cat_video(tmp_path / "metrics.mp4", seconds=1, fps=12, width=176, height=144)
    before = _scrape(service)
    with open(video, "rb") as handle:
        answered = service.wait(
            _submit(
                service,
                files=[("videos", ("metrics.mp4", handle, "video/mp4"))],
                data={"question": "What is the cat doing?", "num_frames": "2", "max_new_tokens": "4"},
            )
        )
    assert answered["status"] == "succeeded", (answered["error"], service.tail_logs())
    broken = service.wait(
        _submit(
            service, files=[("videos", ("x.mp4", io.BytesIO(b"not a video" * 50), "video/mp4"))], data={"question": "q"}
        )
    )
    assert broken["error"]["code"] == "invalid_media"
    with open(sample_videos[1], "rb") as handle:
        cancelled = _submit(
            service, files=[("videos", ("cats_2.mp4", handle, "video/mp4"))], data={"question": "q", "num_frames": "12"}
        )
    assert requests.delete(service.url(f"/v1/jobs/{cancelled}"), timeout=10).json()["status"] == "cancelled"
    after = _scrape(service)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("videoqa_jobs_submitted_total") == 3
    assert delta("videoqa_jobs_finished_total", status="succeeded", reason="") == 1
    assert delta("videoqa_jobs_finished_total", status="failed", reason="invalid_media") == 1
    assert delta("videoqa_jobs_finished_total", status="cancelled", reason="cancelled") == 1
    timings = answered["result"]["timings"]
    for stage in ("queue_wait", "download", "decode", "store_frames", "generate", "total"):
        assert stage in timings and stage in STAGES
        assert delta("videoqa_stage_seconds_count", stage=stage) == 1, stage
        assert delta("videoqa_stage_seconds_bucket", stage=stage, le="+Inf") == 1, stage
        assert abs(delta("videoqa_stage_seconds_sum", stage=stage) - timings[stage]) < 1e-6, stage
    usage = answered["result"]["usage"]
    assert delta("videoqa_tokens_total", kind="completion") == usage["completion_tokens"]
    assert delta("videoqa_tokens_total", kind="prompt") == usage["prompt_tokens"]
    assert delta("videoqa_batch_size_count") >= 1
    assert _value(after, "videoqa_gpu_workers_ready") == 1

    broker = redis.Redis.from_url(service.settings.redis_url)
    for queue in ("cpu", "gpu"):
        assert ("videoqa_queue_depth", (("queue", queue),)) in after
        # Idle now, except the cancelled job's message if the CPU worker has not dropped it yet.
        assert _value(after, "videoqa_queue_depth", queue=queue) <= 1
        assert sum(broker.llen(key) for key in queue_keys(queue)) <= 1


def test_every_api_process_reports_the_same_values(service: RunningService) -> None:
    # gunicorn runs two API processes here; successive scrapes land on either.
    scrapes = [_scrape(service) for _ in range(8)]
    submitted = {_value(s, "videoqa_jobs_submitted_total") for s in scrapes}
    assert len(submitted) == 1


def test_queue_depth_is_read_from_the_broker(local_settings: Settings) -> None:
    """Jobs accepted while no CPU worker runs wait in the cpu queue, and the gauge shows them."""
    client = create_app(local_settings).test_client()
    for _ in range(3):
        response = client.post("/v1/jobs", json={"question": "q", "videos": [{"url": "https://93.184.215.14/a.mp4"}]})
        assert response.status_code == 202
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        for sample in family.samples
    }
    assert _value(samples, "videoqa_queue_depth", queue="cpu") == 3
    assert _value(samples, "videoqa_queue_depth", queue="gpu") == 0
    assert _value(samples, "videoqa_jobs_submitted_total") == 3
    assert _value(samples, "videoqa_gpu_workers_ready") == 0
