"""Process-wide logging for workers and command-line tools: JSON lines (or console lines, per
``VIDEOQA_LOG_FORMAT``), the job id on each line written while a job's task runs."""

from __future__ import annotations

import logging
from contextvars import Token
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

from common.logging_config import JOB_ID_PATTERN, job_id_var, make_formatter
from common.logging_config import configure_logging as configure_root_logging

_TOKEN_ATTR = "_videoqa_job_token"


def _formatting_handlers(log_format: str) -> Any:
    def _reformat(logger: logging.Logger | None = None, **_: Any) -> None:
        # Celery gives its task logger a handler of its own; it writes like the rest.
        for handler in logger.handlers if logger is not None else []:
            handler.setFormatter(make_formatter(log_format, getattr(handler, "stream", None)))

    return _reformat


def _bind_job(task: Any = None, args: Any = None, **_: Any) -> None:
    if task is None or not str(getattr(task, "name", "")).startswith("videoqa."):
        return
    job_id = str(args[0]) if args else ""
    if JOB_ID_PATTERN.fullmatch(job_id):
        setattr(task, _TOKEN_ATTR, job_id_var.set(job_id))


def _unbind_job(task: Any = None, **_: Any) -> None:
    token: Token[str | None] | None = getattr(task, _TOKEN_ATTR, None)
    if token is not None:
        job_id_var.reset(token)
        setattr(task, _TOKEN_ATTR, None)


def _quiet_libraries() -> None:
    """transformers writes through a handler of its own and draws progress bars on stderr;
    its records go through ours instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    configure_root_logging(level, log_format=log_format)
    _quiet_libraries()
    reformat = _formatting_handlers(log_format)
    after_setup_logger.connect(reformat, weak=False)
    after_setup_task_logger.connect(reformat, weak=False)
    task_prerun.connect(_bind_job, weak=False)
    task_postrun.connect(_unbind_job, weak=False)
