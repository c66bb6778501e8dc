"""A Python client of the v1 API over ``requests``: submit, read, wait, watch, cancel, list, ask."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from common.client.errors import APIError, EventsUnavailable, JobFailed, Unreachable, WaitTimedOut
from common.client.models import Event, Job, JobPage, Result, StoredVideo
from common.client.sse import parse_sse

if TYPE_CHECKING:
    from common.settings import Settings

DEFAULT_SERVER = "http://127.0.0.1:8000"
# The API's longest wait in one request; a longer wait is several requests.
MAX_WAIT_S = 60
URL_SCHEMES = ("http://", "https://", "s3://")
# Media: a local file (path), a URL (http, https, s3) as a string, or the API's own JSON entry.
Media = str | os.PathLike[str] | Mapping[str, Any]


def _split_media(items: Sequence[Media], kind: str) -> tuple[list[Path], list[dict[str, Any]]]:
    files: list[Path] = []
    refs: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            refs.append(dict(item))
        elif isinstance(item, str) and item.lower().startswith(URL_SCHEMES):
            refs.append({"url": item})
        else:
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{kind}: no such file {str(path)!r} (URLs start with http://, https:// or s3://)"
                )
            files.append(path)
    return files, refs


def _content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _form_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Client:
    """The API at ``base_url``, with ``api_key`` sent as a bearer token when given.

    Every error is a ``VideoQAError`` carrying the API's code: ``APIError`` for an error answer,
    ``JobFailed`` for a job that ended failed or cancelled, ``Unreachable`` when no answer came,
    ``WaitTimedOut`` when a wait ran out.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = "videoqa-client"
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> Client:
        """The server and key of ``VIDEOQA_SERVER`` and ``VIDEOQA_API_KEY``."""
        from common.settings import load_settings

        settings = settings or load_settings()
        return cls(settings.server, settings.api_key, **kwargs)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self._session.request(method, self.base_url + path, **kwargs)
        except requests.RequestException as exc:
            raise Unreachable(f"no answer from {self.base_url}: {exc.__class__.__name__}") from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: requests.Response, kind: type[APIError] = APIError) -> APIError:
        try:
            error = response.json()["error"]
            code, message, details = str(error["code"]), str(error["message"]), error.get("details")
        except (ValueError, KeyError, TypeError):
            code, message, details = f"http_{response.status_code}", response.text[:200] or response.reason, None
        return kind(message, code=code, http_status=response.status_code, details=details)

    def submit(
        self,
        videos: Sequence[Media] = (),
        question: str = "",
        *,
        images: Sequence[Media] = (),
        prompt: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        generation: Mapping[str, Any] | None = None,
        webhook: str | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        wait: int | None = None,
        parent: str | None = None,
    ) -> Job:
        """Submit a job. Local files are uploaded (multipart); URLs and ``s3://`` keys are sent as
        JSON; one request takes one or the other. ``wait`` (seconds, at most 60) asks the server to
        answer once the job has ended, where it supports ``Prefer: wait``. A stored video is
        ``{"video_id": ...}`` (``StoredVideo.ref``); ``parent`` (a succeeded job's id, with no
        media) asks a follow-up over that job's media."""
        video_files, video_refs = _split_media(videos, "videos")
        image_files, image_refs = _split_media(images, "images")
        headers = {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if wait:
            headers["Prefer"] = f"wait={min(int(wait), MAX_WAIT_S)}"
        hook = {"url": webhook} if isinstance(webhook, str) else dict(webhook) if webhook else None
        if video_files or image_files:
            if video_refs or image_refs:
                raise ValueError("one job takes uploaded files or URLs, not both")
            # Multipart carries the options as flat text fields, as curl users send them.
            fields = {"question": question, "prompt": prompt, **(sampling or {}), **(generation or {})}
            if hook:
                fields["webhook_url"] = hook["url"]
                if hook.get("events"):
                    fields["webhook_events"] = ",".join(hook["events"])
            data = {name: _form_value(value) for name, value in fields.items() if value is not None}
            with ExitStack() as files:
                parts = [
                    (kind, (path.name, files.enter_context(open(path, "rb")), _content_type(path)))
                    for kind, paths in (("videos", video_files), ("images", image_files))
                    for path in paths
                ]
                response = self._request("POST", "/v1/jobs", files=parts, data=data, headers=headers)
            return Job.from_json(response.json())
        body: dict[str, Any] = {"question": question, "videos": video_refs, "images": image_refs}
        options = {"prompt": prompt, "sampling": sampling, "generation": generation, "webhook": hook, "parent": parent}
        for name, value in options.items():
            if value is not None:
                body[name] = dict(value) if isinstance(value, Mapping) else value
        return Job.from_json(self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def submit_fields(self, videos: Sequence[Media] = (), **fields: Any) -> Job:
        """``submit`` with the options as flat fields, as a multipart form (and curl) carries them:
        ``num_frames="4"``, ``max_new_tokens="8"``, ``webhook_url=...``, ``webhook_events="failed,cancelled"``;
        ``question``, ``prompt``, ``images`` and ``idempotency_key`` as ``submit`` takes them."""
        from common.schemas import GENERATION_FIELDS, SAMPLING_FIELDS

        sampling = {name: fields.pop(name) for name in SAMPLING_FIELDS if name in fields}
        generation = {name: fields.pop(name) for name in GENERATION_FIELDS if name in fields}
        webhook: dict[str, Any] | None = None
        if "webhook_url" in fields:
            webhook = {"url": fields.pop("webhook_url")}
            if "webhook_events" in fields:
                webhook["events"] = fields.pop("webhook_events").split(",")
        return self.submit(videos, sampling=sampling, generation=generation, webhook=webhook, **fields)

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> Job:
        """Cancel the job: a queued job never runs, a generating one stops (``409`` once ended)."""
        return Job.from_json(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.5) -> Job:
        """The job's record once it has ended; ``WaitTimedOut`` after ``timeout`` seconds (None:
        no limit). Each request asks the server to hold it until the job ends (``?wait=``); a
        server that answers at once is asked again after ``poll_interval``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_WAIT_S if deadline is None else deadline - time.monotonic()
            hold = max(0, min(MAX_WAIT_S, int(left)))
            asked = time.monotonic()
            response = self._request(
                "GET", f"/v1/jobs/{job_id}", params={"wait": hold} if hold else None, timeout=self.timeout + hold
            )
            job = Job.from_json(response.json())
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimedOut(job, float(timeout or 0))
            pause = poll_interval - (time.monotonic() - asked)
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
            if pause > 0:
                time.sleep(pause)

    def events(self, job_id: str, last_event_id: str | None = None, *, reconnects: int = 3) -> Iterator[Event]:
        """The job's events (``status``, ``token``, ``done``) as they happen, ending after ``done``.

        From the job's start, or after ``last_event_id``. A connection that breaks is opened again
        with the last id received, so nothing is missed or repeated; ``Unreachable`` after
        ``reconnects`` attempts in a row without an event. ``EventsUnavailable`` when the server has
        no event stream (fall back on ``wait``).
        """
        failures = 0
        error: requests.RequestException | None = None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            try:
                # The read timeout only bounds silence: the server sends keep-alives.
                response = self._session.get(
                    f"{self.base_url}/v1/jobs/{job_id}/events",
                    headers=headers,
                    stream=True,
                    timeout=(self.timeout, max(self.timeout, 75.0)),
                )
            except requests.RequestException as exc:
                response, error = None, exc
            if response is not None:
                self._check_event_stream(job_id, response)
                try:
                    for message in parse_sse(response.iter_content(chunk_size=None)):
                        event = Event.from_message(message.event, message.data, message.id)
                        last_event_id, failures = message.id, 0
                        yield event
                        if event.event == "done":
                            return
                    error = None
                except requests.RequestException as exc:
                    error = exc
                finally:
                    response.close()
            failures += 1
            if failures > reconnects:
                cause = f": {error.__class__.__name__}" if error else ""
                raise Unreachable(f"the event stream of job {job_id} broke off {failures} times{cause}")
            time.sleep(min(0.25 * 2**failures, 5.0))

    def _check_event_stream(self, job_id: str, response: requests.Response) -> None:
        if response.status_code in (404, 405) or (
            response.ok and not response.headers.get("Content-Type", "").startswith("text/event-stream")
        ):
            response.close()
            self.get(job_id)  # an unknown job raises its own not_found
            raise EventsUnavailable(
                f"this server has no event stream for jobs (GET /v1/jobs/{{id}}/events answered "
                f"{response.status_code}); use wait()",
                code="events_unavailable",
                http_status=response.status_code,
            )
        if response.status_code >= 400:
            response.close()
            raise self._error(response)

    def store_video(
        self,
        video: str | os.PathLike[str],
        *,
        sampling: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> StoredVideo:
        """Store a video once (``POST /v1/videos``): a local file is uploaded, a URL or ``s3://``
        key sent as JSON. It is ``processing`` until its frames are sampled: see ``wait_video``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if isinstance(video, str) and video.lower().startswith(URL_SCHEMES):
            body = {"url": video, "sampling": dict(sampling or {})}
            return StoredVideo.from_json(self._request("POST", "/v1/videos", json=body, headers=headers).json())
        path = Path(video)
        if not path.is_file():
            raise FileNotFoundError(f"no such file {str(path)!r} (URLs start with http://, https:// or s3://)")
        data = {name: _form_value(value) for name, value in (sampling or {}).items() if value is not None}
        with open(path, "rb") as handle:
            files = [("video", (path.name, handle, _content_type(path)))]
            response = self._request("POST", "/v1/videos", files=files, data=data, headers=headers)
        return StoredVideo.from_json(response.json())

    def video(self, video_id: str) -> StoredVideo:
        return StoredVideo.from_json(self._request("GET", f"/v1/videos/{video_id}").json())

    def wait_video(self, video_id: str, timeout: float = 300.0) -> StoredVideo:
        """The video once it is ``ready`` or ``failed``; ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            hold = max(1, min(MAX_WAIT_S, int(deadline - time.monotonic())))
            response = self._request(
                "GET", f"/v1/videos/{video_id}", params={"wait": hold}, timeout=self.timeout + hold
            )
            video = StoredVideo.from_json(response.json())
            if video.status != "processing":
                return video
            if time.monotonic() >= deadline:
                raise TimeoutError(f"video {video_id} is still processing after {timeout:g} s")

    def delete_video(self, video_id: str) -> None:
        """Delete it and its frames; ``APIError`` with code ``video_in_use`` while a job uses it."""
        self._request("DELETE", f"/v1/videos/{video_id}")

    def ask(self, videos: Sequence[Media], question: str, *, timeout: float | None = None, **options: Any) -> Result:
        """Submit, wait for the answer and return it; ``JobFailed`` when the job failed or was
        cancelled. ``options`` are ``submit``'s (``images``, ``prompt``, ``sampling``...)."""
        job = self.wait(self.submit(videos, question, **options).id, timeout)
        if job.status != "succeeded" or job.result is None:
            raise JobFailed(job)
        return job.result

    def ready(self) -> bool:
        """Whether the service is ready for jobs now (``GET /readyz`` answers 200)."""
        try:
            self._request("GET", "/readyz", timeout=min(self.timeout, 5.0))
        except (APIError, Unreachable):
            return False
        return True

    def wait_until_up(self, timeout: float = 30.0, *, poll_interval: float = 0.1) -> None:
        """Until the API answers (``GET /healthz``); ``Unreachable`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("GET", "/healthz", timeout=min(self.timeout, 2.0))
                return
            except APIError as exc:
                if exc.http_status < 500:
                    return
            except Unreachable:
                pass
            if time.monotonic() >= deadline:
                raise Unreachable(f"{self.base_url} did not answer within {timeout:.0f} s")
            time.sleep(poll_interval)

    # Last in the class, so that ``list`` in the annotations above means the built-in.
    def list(self, limit: int = 20, before: float | None = None) -> JobPage:
        """Recent jobs, newest first; pass ``next_before`` back as ``before`` for the next page."""
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        body = self._request("GET", "/v1/jobs", params=params).json()
        return JobPage(jobs=[Job.from_json(job) for job in body["jobs"]], next_before=body.get("next_before"))
