"""Logs as one JSON object a line, for the API and the workers alike.

Every line that concerns a job carries ``job_id``: code running for a job binds it in a context
variable, and lines written by Celery or gunicorn about a job's task or request have it read from
their arguments. Credentials and query strings of URLs are masked before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from common.redaction import redact

job_id_var: ContextVar[str | None] = ContextVar("videoqa_job_id", default=None)

# Job ids are uuid4 hex; task arguments and job URLs show them in this form.
JOB_ID_PATTERN = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
_TASK_PREFIX = "videoqa."


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Lines logged inside the block carry ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


def _job_id_of(record: logging.LogRecord) -> str | None:
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    bound = job_id_var.get()
    if bound:
        return bound
    # Celery logs "Task videoqa.ingest[...] received/succeeded" with a mapping of the task's
    # name and argument repr; our tasks take the job id as their only argument.
    if isinstance(record.args, Mapping) and str(record.args.get("name", "")).startswith(_TASK_PREFIX):
        found = JOB_ID_PATTERN.search(str(record.args.get("args", "")))
        if found:
            return found.group(0)
    return None


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "pid", "job_id"?, ...fields}`` on one line.

    ``extra={"fields": {...}}`` adds structured fields (the access log uses it).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "pid": record.process,
        }
        job_id = _job_id_of(record)
        if job_id:
            entry["job_id"] = job_id
        if isinstance(record.args, Mapping) and record.args.get("id") and record.args.get("name"):
            entry["task_id"] = str(record.args["id"])
            entry["task"] = str(record.args["name"])
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        return json.dumps(entry, default=str, ensure_ascii=False)


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """The root logger writes JSON lines; warnings become log records too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(json_handler(stream))
    root.setLevel(level)
    logging.captureWarnings(True)
