"""Logs for the API and the workers alike: one JSON object a line, or short human-readable lines
on a terminal (``VIDEOQA_LOG_FORMAT``: ``auto`` picks console when stderr is a terminal).

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


class ConsoleFormatter(logging.Formatter):
    """``12:04:05 INFO  worker.cpu.stage  message  job=...`` for a person at a terminal: local time,
    the same masking as the JSON lines, and the exception (if any) below the line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{when} {record.levelname:<7} {record.name}  {redact(record.getMessage())}"
        job_id = _job_id_of(record)
        if job_id:
            line += f"  job={job_id}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line += "\n" + redact(record.exc_text)
        return line


def use_console(log_format: str, stream: TextIO | None = None) -> bool:
    """Whether ``log_format`` (``auto``, ``json`` or ``console``) means console lines on ``stream``."""
    if log_format == "auto":
        isatty = getattr(stream or sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return log_format == "console"


def make_formatter(log_format: str = "json", stream: TextIO | None = None) -> logging.Formatter:
    return ConsoleFormatter() if use_console(log_format, stream) else JsonFormatter()


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(level: str = "INFO", stream: TextIO | None = None, log_format: str = "json") -> None:
    """The root logger writes JSON lines (or console lines, see ``make_formatter``); warnings
    become log records too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(log_format, stream))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
