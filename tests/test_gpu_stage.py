"""The GPU stage in this process, on real Redis and local storage with the tiny model: a job
handed over by ``admit`` while another generates joins it, is written like any other, and reuses
the frames' prefix that the first job left in the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.settings import load_settings
from common.storage import open_store
from tests.conftest import service_env
from tests.test_gpu_worker import frames, queue_gpu_job, unbatched
from worker.gpu.model import LoadedModel, load_model
from worker.gpu.prefix_cache import PrefixCache
from worker.gpu.stage import AnswerContext, answer_jobs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def test_a_job_admitted_mid_batch_joins_it_and_is_written_with_its_solo_answer(
    spare_redis_url: str, loaded: LoadedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        service_env(spare_redis_url, {}, tiny_model_dir, VIDEOQA_STORAGE_URL=str(tmp_path / "store"))
    )
    store = open_store(settings)
    jobs = JobStore(redis_client(settings), ttl_s=60)
    images = frames(3, 40)
    cases = {"long": ("What is happening in this video?", 40), "late": ("How many people are walking?", 5)}
    ids = {name: queue_gpu_job(settings, store, images, question, new) for name, (question, new) in cases.items()}
    asked: list[int] = []

    def admit(free_rows: int) -> list[str]:
        asked.append(free_rows)
        return [ids["late"]] if len(asked) == 5 else []

    ctx = AnswerContext(jobs=jobs, store=store, model=loaded, max_rows=4, prefixes=PrefixCache(2**28, loaded.model_id))
    assert answer_jobs([ids["long"]], ctx, admit=admit) == {}

    done = {name: jobs.get(job_id) for name, job_id in ids.items()}
    for name, (question, new) in cases.items():
        job = done[name]
        assert job is not None and job.status is JobStatus.SUCCEEDED and job.result is not None, job
        expected = unbatched(loaded, images, question, new)
        assert job.result["answer"] == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert job.result["usage"]["completion_tokens"] == len(expected)
    late, long = done["late"], done["long"]
    assert late is not None and long is not None and late.result is not None and long.result is not None
    # It joined after the first job started, and was written before it.
    assert late.stages["generate"]["start"] > long.stages["generate"]["start"]
    assert late.stages["generate"]["end"] < long.stages["generate"]["end"]
    assert long.result["usage"]["cached_tokens"] == 0
    assert late.result["usage"]["cached_tokens"] >= 0.9 * late.result["usage"]["prompt_tokens"]
    assert asked[0] == 3  # four rows, one taken
