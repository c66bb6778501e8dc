"""The API's logs: gunicorn's logger writing JSON lines (``--logger-class api.logs.JsonLogger``;
console lines instead per ``VIDEOQA_LOG_FORMAT``) and the job id bound while a request about a job is handled.

The access log keeps structured fields (method, path, status, duration) and the job id of the
request, read from its path or from the ``Location`` of a job just created. Request headers and
the environment are never logged.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, request
from gunicorn.glogging import Logger

from common.logging_config import JOB_ID_PATTERN, configure_logging, job_id_var, make_formatter
from common.settings import SettingsError, load_settings


class JsonLogger(Logger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        try:
            settings = load_settings()
            level, log_format = settings.log_level, settings.log_format
        except SettingsError:
            level, log_format = "INFO", "json"  # create_app stops the worker with the settings' own message
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(make_formatter(log_format, getattr(handler, "stream", None)))
        # The application's own loggers propagate to the root logger, at VIDEOQA_LOG_LEVEL.
        configure_logging(level, log_format=log_format)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        status = str(resp.status).split(None, 1)[0]
        path = str(environ.get("PATH_INFO", ""))
        headers = dict((name.lower(), value) for name, value in (resp.headers or []))
        found = JOB_ID_PATTERN.search(path) or JOB_ID_PATTERN.search(str(headers.get("location", "")))
        fields = {
            "method": environ.get("REQUEST_METHOD"),
            "path": path,
            "status": int(status) if status.isdigit() else status,
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "bytes": getattr(resp, "sent", None),
            "remote": environ.get("REMOTE_ADDR"),
        }
        try:
            self.access_log.info(
                "%s %s %s",
                fields["method"],
                path,
                status,
                extra={"fields": fields, "job_id": found.group(0) if found else None},
            )
        except Exception:  # noqa: BLE001 - a broken access line must not fail the request it describes
            self.error("failed to log the request to %s", path)


def bind_job_ids(app: Flask) -> None:
    """Lines logged while a request about a job is handled carry its id (``submit_job`` binds
    the id of a job it creates)."""

    @app.before_request
    def _bind() -> None:
        g.job_log_token = job_id_var.set((request.view_args or {}).get("job_id"))

    @app.teardown_request
    def _unbind(_: BaseException | None) -> None:
        token = g.pop("job_log_token", None)
        if token is not None:
            job_id_var.reset(token)
