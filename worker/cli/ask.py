"""``videoqa ask``: one question about videos to a running service, answered as it is generated.

A client command: it imports no worker code (torch, transformers, PyAV), only ``common.client``.
Progress goes to stderr (a spinner on a terminal, one line per stage otherwise), the answer and its
frames to stdout. Exit status: 0 answered, 1 the job failed or the service could not be reached,
2 a usage error (the service's ``400``s included), 130 interrupted (the job is cancelled).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from common.client import APIError, Client, EventsUnavailable, Job, Unreachable, VideoQAError

POLL_S = 0.5


class _Progress:
    """Stage changes as plain lines on stderr, or a rich spinner when stderr is a terminal."""

    def __init__(self, job_id: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.job_id = job_id
        self.started = time.monotonic()
        self.shown: str | None = None
        self.stopped = False
        self.spinner = self.console.status("submitted") if self.console.is_terminal else None
        if self.spinner:
            self.spinner.start()

    def show(self, status: str) -> None:
        if status == self.shown or self.stopped:
            return
        self.shown = status
        line = f"job {self.job_id}: {status} ({time.monotonic() - self.started:.1f} s)"
        if self.spinner:
            self.spinner.update(line)
        else:
            click.echo(line, err=True)

    def stop(self) -> None:
        """No progress from here on: the answer is being written to the same terminal."""
        self.stopped = True
        if self.spinner:
            self.spinner.stop()
            self.spinner = None


def _follow(client: Client, job: Job, progress: _Progress, stream: bool) -> tuple[Job, str]:
    """The job's final record, and the answer's text as it was streamed (empty without events)."""
    streamed = ""
    try:
        for event in client.events(job.id):
            if event.event == "token" and stream:
                if not streamed:
                    progress.stop()
                    click.echo("Answer: ", nl=False)
                streamed += event.text
                click.echo(event.text, nl=False)
            elif event.job is not None:
                progress.show(event.job.status)
                if event.event == "done":
                    return event.job, streamed
    except (EventsUnavailable, Unreachable):
        pass  # a server without events, or a stream that broke off: read the record instead
    while not job.done:
        time.sleep(POLL_S)
        job = client.get(job.id)
        progress.show(job.status)
    return job, streamed


def _print_answer(job: Job, streamed: str) -> None:
    assert job.result is not None
    answer = job.result.answer
    if not streamed:
        click.echo(f"Answer: {answer}")
    elif streamed == answer:
        click.echo()
    else:  # some tokens were missed: the record's answer is the one that counts
        click.echo(f"\nAnswer: {answer}")
    click.echo("Frames:")
    for frame in job.result.frames:
        click.echo(f"  video {frame.video}, frame {frame.index} at {frame.time:.2f} s")


def run_ask(client: Client, videos: Sequence[str], question: str, options: dict[str, Any], as_json: bool) -> int:
    try:
        job = client.submit(videos, question, **options)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except APIError as exc:
        if exc.http_status == 400:
            raise click.UsageError(f"the service refused the request: {exc.message}") from None
        raise
    progress = _Progress(job.id)
    try:
        # Inside the try: an interrupt that comes as soon as the job is shown still cancels it.
        progress.show(job.status)
        job, streamed = _follow(client, job, progress, stream=not as_json)
    except KeyboardInterrupt:
        progress.stop()
        click.echo(f"\ncancelling job {job.id}", err=True)
        try:
            client.cancel(job.id)
        except VideoQAError as exc:
            click.echo(f"could not cancel job {job.id}: {exc}", err=True)
        return 130
    finally:
        progress.stop()
    if as_json:
        click.echo(json.dumps(job.raw, indent=2))
    if job.status != "succeeded":
        if streamed:
            click.echo()
        error = job.error or {"code": "cancelled", "message": "the job was cancelled"}
        click.echo(f"job {job.id} {job.status}: {error.get('code')}: {error.get('message')}", err=True)
        return 1
    if not as_json:
        _print_answer(job, streamed)
    return 0


@click.command()
@click.argument("videos", nargs=-1, required=True)
@click.option("-q", "--question", required=True, help="what to ask about the videos")
@click.option("--frames", type=click.IntRange(min=1), default=None, help="frames sampled from each video")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="longest answer, in tokens")
@click.option("--server", default=None, help="the API's URL  [default: VIDEOQA_SERVER, else http://127.0.0.1:8000]")
@click.option("--api-key", default=None, help="[default: VIDEOQA_API_KEY]")
@click.option("--json", "as_json", is_flag=True, help="print the job's final record as JSON")
def ask(
    videos: tuple[str, ...],
    question: str,
    frames: int | None,
    max_new_tokens: int | None,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Ask QUESTION about VIDEOS (files, http(s) URLs or s3:// keys) of a running service.

    Shows each stage while the job runs, streams the answer, and prints the frames it saw.
    Ctrl-C cancels the job.
    """
    from common.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    options: dict[str, Any] = {}
    if frames is not None:
        options["sampling"] = {"num_frames": frames}
    if max_new_tokens is not None:
        options["generation"] = {"max_new_tokens": max_new_tokens}
    client = Client(server or settings.server, api_key or settings.api_key)
    # Honour Ctrl-C (and cancel the job) even when started with SIGINT ignored, as a shell starts
    # background commands.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run_ask(client, videos, question, options, as_json)
    except VideoQAError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    except KeyboardInterrupt:  # before the job existed: nothing to cancel
        code = 130
    sys.exit(code)
