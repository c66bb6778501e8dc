"""The JSON log format: one object a line, the job id where a line concerns a job, no credentials.
(The processes' real logs are checked in tests/test_scaling.py.)"""

from __future__ import annotations

import io
import json
import logging
import sys

from common.logging_config import JsonFormatter, configure_logging, job_context, redact

JOB = "0123456789abcdef0123456789abcdef"


def _line(record: logging.LogRecord) -> dict[str, object]:
    text = JsonFormatter().format(record)
    assert "\n" not in text
    return json.loads(text)


def _record(msg: str, args: object = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("videoqa.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_credentials_in_urls_are_masked() -> None:
    assert redact("Connected to redis://default:s3cret@redis:6379/0") == "Connected to redis://default:***@redis:6379/0"
    assert redact("http://minio:9000/x and rediss://:pw@h/1") == "http://minio:9000/x and rediss://:***@h/1"
    entry = _line(_record("broker %s", ("redis://u:p4ss@h:6379/0",)))
    assert "p4ss" not in json.dumps(entry)


def test_query_strings_and_signatures_in_urls_are_masked() -> None:
    from common.redaction import public_url

    signed = "https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=AKIA1&X-Amz-Signature=f00d#t=1"
    assert redact(f"fetching {signed} failed") == "fetching https://b.s3.amazonaws.com/v.mp4?*** failed"
    assert redact(f"FetchFailed('{signed}')") == "FetchFailed('https://b.s3.amazonaws.com/v.mp4?***')"
    assert redact("GET /v.mp4?X-Amz-Signature=f00d&x=1 HTTP/1.1") == "GET /v.mp4?X-Amz-Signature=***&x=1 HTTP/1.1"
    assert redact("https://h/plain.mp4 answered 404") == "https://h/plain.mp4 answered 404"
    assert redact("max_token=5 max_new_tokens=9") == "max_token=5 max_new_tokens=9"
    assert public_url(signed) == "https://b.s3.amazonaws.com/v.mp4?***"
    assert public_url("http://user:pw@[::1]:8080/a b.mp4") == "http://[::1]:8080/a b.mp4"
    assert public_url("https://h/plain.mp4") == "https://h/plain.mp4"
    entry = _line(_record("download of %s broke off", (signed,)))
    assert "f00d" not in json.dumps(entry) and "AKIA1" not in json.dumps(entry)


def test_the_job_id_comes_from_the_context_or_from_celery_task_lines() -> None:
    assert "job_id" not in _line(_record("no job here"))
    with job_context(JOB):
        assert _line(_record("working"))["job_id"] == JOB
    assert "job_id" not in _line(_record("after"))
    # Celery's "Task ... succeeded" line: a mapping of the task's name, id and argument repr.
    celery = _record("Task %(name)s[%(id)s] succeeded", {"name": "videoqa.ingest", "id": "t-1", "args": f"('{JOB}',)"})
    entry = _line(celery)
    assert (entry["job_id"], entry["task_id"], entry["task"]) == (JOB, "t-1", "videoqa.ingest")
    assert entry["message"] == "Task videoqa.ingest[t-1] succeeded"
    # Another application's task is not mistaken for ours.
    assert "job_id" not in _line(_record("x", {"name": "other.task", "id": "t", "args": f"('{JOB}',)"}))


def test_structured_fields_and_exceptions_stay_on_one_line() -> None:
    entry = _line(_record("POST /v1/jobs 202", fields={"status": 202, "duration_ms": 3.5}, job_id=JOB))
    assert entry["status"] == 202 and entry["job_id"] == JOB
    assert {"ts", "level", "logger", "message", "pid"} <= set(entry)
    try:
        raise ValueError("bad redis://a:b@c")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = _line(record)
    assert "ValueError" in str(entry["exc"]) and "a:b@" not in str(entry["exc"])


def test_configure_logging_sends_the_root_logger_through_the_formatter() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", stream)
        logging.getLogger("videoqa.anything").info("hello %s", "world")
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["message"] == "hello world"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_lines_for_a_terminal_json_otherwise_or_as_asked() -> None:
    from common.logging_config import ConsoleFormatter, make_formatter

    assert isinstance(make_formatter("auto", _Terminal()), ConsoleFormatter)
    assert isinstance(make_formatter("auto", io.StringIO()), JsonFormatter)
    assert isinstance(make_formatter("json", _Terminal()), JsonFormatter)
    assert isinstance(make_formatter("console", io.StringIO()), ConsoleFormatter)
    with job_context(JOB):
        line = ConsoleFormatter().format(_record("fetching %s", ("redis://u:p4ss@h/0",)))
    assert line.endswith(f"INFO    videoqa.test  fetching redis://u:***@h/0  job={JOB}")
    assert not line.startswith("{")


def test_the_log_format_setting_reaches_the_root_logger() -> None:
    from common.settings import load_settings

    assert load_settings({}).log_format == "auto"
    stream = _Terminal()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", stream, log_format=load_settings({"VIDEOQA_LOG_FORMAT": "auto"}).log_format)
        logging.getLogger("videoqa.anything").info("hello")
        configure_logging("INFO", stream, log_format=load_settings({"VIDEOQA_LOG_FORMAT": "json"}).log_format)
        logging.getLogger("videoqa.anything").info("again")
        console, json_line = stream.getvalue().splitlines()
        assert console.endswith("INFO    videoqa.anything  hello")
        assert json.loads(json_line)["message"] == "again"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
