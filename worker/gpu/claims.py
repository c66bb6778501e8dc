"""Dynamic batching on Celery: the generate task that Celery delivers leads a batch, and claims up
to B-1 more generate messages from the same ``gpu`` queue, waiting at most T ms for them.

Why this way. The other ways to batch either lose a guarantee or add a second queue to keep
consistent: prefetching B messages into the worker (``celery-batches``) keeps them in the
worker's memory, where a running task cannot see them, and that package acknowledges late only
in part; a Redis list of "ready" job ids next to the Celery messages means two deliveries per
job and a reconciler between them. Here every job still has exactly one Celery message, the one
the CPU stage sent, and each message is handled the way Celery handles its own:

* Claimed with kombu's ``basic_get`` on the same broker, without acknowledgement: the Redis
  transport keeps the message in its ``unacked`` hash, with the visibility timeout, until it is
  acknowledged. A worker that dies mid-batch loses nothing: closing the connection puts the
  claimed messages back at the head of the queue, and after a hard kill any worker restores them
  once the visibility timeout has passed, as it does for the leader's own message.
* Acknowledged only once the job's terminal state is written (or the job needed nothing).
* A transient error (storage unreachable) retries the job as Celery's ``autoretry_for`` would:
  the message is sent again with ``retries + 1`` and an exponential countdown, and the job fails
  once the retries are spent. A bug in a batch fails its claimed jobs, as ``on_failure`` fails
  the leader's.
* A message that is not a generate task, or whose ETA (a retry's countdown) is still ahead, goes
  back to the queue untouched; draining stops there, so the worker does not spin on it.
* A malformed message (not JSON, a body that does not decode, not one job id as its arguments) is
  refused without being deserialized beyond JSON, logged once and removed: it can be nobody's job,
  and returned to the queue it would come back to every leader.

The GPU worker runs Celery's solo pool, so the task runs in the process that holds the model and
nothing else runs meanwhile; its prefetch of one (``acks_late``) leaves every other message in
Redis, for this worker's next batch or another GPU's. Flower sees the leader's task as usual and,
through task events sent here, the claimed ones as received, started and ended on this worker.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message

from common.celery_config import GENERATE_TASK, GPU_QUEUE, RETRY_BACKOFF_MAX_S
from common.errors import TransientError

log = logging.getLogger(__name__)

POLL_S = 0.005  # how often an empty queue is asked again while a batch waits to fill


@dataclass
class Claim:
    """One generate message taken from the queue for the current batch."""

    job_id: str
    task_id: str
    retries: int
    message: Message
    settled: bool = field(default=False)


class Malformed(ValueError):
    """A message on the queue that no worker can run."""


def _parse(message: Message) -> Claim | None:
    """The message's claim; None for a message to leave to others (another task, an ETA ahead).
    Raises ``Malformed`` for one that cannot be run at all."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    if headers.get("task") != GENERATE_TASK:
        return None
    try:
        eta = headers.get("eta")
        if eta and datetime.fromisoformat(eta).astimezone(UTC) > datetime.now(UTC):
            return None
        retries = int(headers.get("retries") or 0)
        # Only JSON is accepted: a pickle (or any other) body raises ContentDisallowed here, before
        # anything is deserialized.
        payload = message.decode()
    except (ContentDisallowed, DecodeError, TypeError, ValueError) as exc:
        raise Malformed(f"{type(exc).__name__}: {exc}") from None
    args, kwargs = (payload[0], payload[1]) if isinstance(payload, list) and len(payload) == 3 else (None, None)
    # The task's one argument, by position (as the CPU stage sends it) or by name.
    given: list[Any] = []
    if isinstance(args, list) and isinstance(kwargs, dict) and set(kwargs) <= {"job_id"}:
        given = args + list(kwargs.values())
    if not (len(given) == 1 and isinstance(given[0], str) and given[0]):
        raise Malformed("its arguments are not one job id")
    return Claim(job_id=given[0], task_id=str(headers.get("id")), retries=retries, message=message)


def _describe(message: Message) -> str:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return f"task {str(headers.get('task'))[:80]!r} id {str(headers.get('id'))[:80]!r} ({message.content_type})"


class GpuQueue:
    """Claims, acknowledges and retries generate messages beyond the one Celery delivered."""

    def __init__(
        self, app: Celery, *, hostname: str, max_retries: int, backoff_s: int = 2, queue: str = GPU_QUEUE
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.queue = queue

    @contextmanager
    def claim(self, limit: int, wait_s: float, *, exclude: str | None = None) -> Iterator[list[Claim]]:
        """Up to ``limit`` claims, waiting at most ``wait_s`` for the queue to offer them. Claims
        left unsettled when the block ends (an exception, a shutdown) go back to the queue."""
        if limit <= 0:
            yield []
            return
        with self.app.connection_for_read() as connection:
            bound = Queue(self.queue)(connection.default_channel)
            claims = self.drain(bound, limit, wait_s, exclude=exclude)
            if claims:
                self._events("task-received", claims)
                self._events("task-started", claims)
            try:
                yield claims
            finally:
                unsettled = [claim for claim in claims if not claim.settled]
                if unsettled:
                    # Closing the channel with these unacknowledged puts them back at the head of
                    # the queue (kombu restores unacked messages when a channel closes).
                    log.warning("returning %d claimed jobs to the queue", len(unsettled))

    def drain(
        self, bound: Queue, limit: int, wait_s: float, *, exclude: str | Collection[str] | None = None
    ) -> list[Claim]:
        """Claims from ``bound`` (the queue on an open channel); see ``claim``. Messages of jobs in
        ``exclude`` (held already) are acknowledged as duplicates."""
        excluded = {exclude} if isinstance(exclude, str) else set(exclude or ())
        claims: list[Claim] = []
        deadline = time.monotonic() + wait_s
        while len(claims) < limit:
            try:
                message = bound.get(no_ack=False, accept=["json"])
            except (DecodeError, ValueError, KeyError, TypeError) as exc:
                # Not even a message envelope: the transport has taken it off the queue already.
                log.error("dropped a malformed message from the %s queue: %s: %s", self.queue, type(exc).__name__, exc)
                continue
            if message is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(POLL_S)
                continue
            try:
                claim = _parse(message)
            except Malformed as exc:
                log.error("removed a malformed message from the %s queue, %s: %s", self.queue, _describe(message), exc)
                message.ack()
                continue
            if claim is None:
                message.reject(requeue=True)  # not ours to run now: back to the queue's tail
                break
            if claim.job_id in excluded or any(c.job_id == claim.job_id for c in claims):
                # A second message for a job this batch already holds: it needs no run of its own.
                message.ack()
                continue
            claims.append(claim)
        return claims

    def announce(self, claims: list[Claim]) -> None:
        """Flower's received and started events for claims taken with ``drain``."""
        if claims:
            self._events("task-received", claims)
            self._events("task-started", claims)

    def done(self, claim: Claim) -> None:
        claim.message.ack()
        claim.settled = True
        self._events("task-succeeded", [claim], result="None", runtime=0.0)

    def retry(self, claim: Claim, exc: TransientError, on_give_up: Callable[[Claim, TransientError], None]) -> None:
        """Send the job's message again later, or call ``on_give_up(claim, exc)`` once the
        retries are spent; acknowledge the claimed message either way."""
        if claim.retries >= self.max_retries:
            on_give_up(claim, exc)
            self._events("task-failed", [claim], exception=repr(exc), traceback="")
        else:
            # Celery's retry_backoff with jitter and the same cap, as the task's own policy.
            countdown = random.uniform(0, min(RETRY_BACKOFF_MAX_S, self.backoff_s * 2**claim.retries))
            self.app.send_task(
                GENERATE_TASK,
                args=[claim.job_id],
                task_id=claim.task_id,
                retries=claim.retries + 1,
                countdown=countdown,
            )
            self._events("task-retried", [claim], exception=repr(exc), traceback="")
        claim.message.ack()
        claim.settled = True

    def fail(self, claim: Claim, exc: BaseException) -> None:
        claim.message.ack()
        claim.settled = True
        self._events("task-failed", [claim], exception=repr(exc), traceback="")

    def _events(self, kind: str, claims: list[Claim], **fields: Any) -> None:
        """Task events for Flower; best effort, a monitoring gap never fails a job."""
        if not self.app.conf.worker_send_task_events:
            return
        try:
            with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                for claim in claims:
                    extra = (
                        {"name": GENERATE_TASK, "args": repr([claim.job_id]), "kwargs": "{}", "retries": claim.retries}
                        if kind == "task-received"
                        else {}
                    )
                    dispatcher.send(kind, uuid=claim.task_id, **extra, **fields)
        except Exception:
            log.debug("could not send %s events", kind, exc_info=True)
