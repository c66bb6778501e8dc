"""The next batch's jobs claimed and loaded while the current batch generates, so the model never
waits on storage, PNG decoding or the processor.

A thread of its own claims generate messages from the gpu queue (the way worker.gpu.claims
claims them: unacknowledged, on a channel of its own) up to ``capacity`` held at once, and loads
each job (``worker.gpu.stage.load_job``: record, frames fetched in parallel, decoded, tokenised,
turned into uint8 tensors, pinned on CUDA). Loading writes nothing, so a job held here is still
``queued_gpu`` with its attempts untouched: whatever happens to the worker, the job is as it was
when its message was in the queue.

* ``take(limit)`` hands over loaded jobs without blocking (``take_waiting`` waits a little for a
  batch to fill): what a step loop's ``admit(free_slots)`` needs.
* Settling a taken job's message (``done``, ``retry``, ``fail``) happens after its terminal
  write, through the same channel, under the lock that serialises every use of it (kombu's
  channels are not made for two threads).
* ``close`` stops claiming and closes the channel: messages held but not taken go back to the
  head of the queue (kombu restores a channel's unacknowledged messages when it closes); after a
  kill, the broker restores them once the visibility timeout has passed, as any claimed message.
* A job found ended (cancelled while queued, finished by an earlier delivery) needs nothing: its
  message is acknowledged here at once. A job cancelled after it was loaded is found cancelled
  when it starts, and stays so.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kombu import Queue

from common.errors import TransientError
from worker.gpu.claims import Claim, GpuQueue
from worker.gpu.model import LoadedModel

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.01  # how often an empty queue is asked again


def with_own_processor(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with a processor of its own, for loading jobs on the prefetch thread while the
    task's thread decodes answers: a fast tokenizer is not to be used by two threads at once (it
    changes its own state per call)."""
    return replace(loaded, processor=copy.deepcopy(loaded.processor))


@dataclass
class Ahead:
    """A claimed job, loaded (``loaded`` is what ``load(job_id)`` returned)."""

    claim: Claim
    loaded: Any


class Prefetcher:
    def __init__(
        self,
        gpu_queue: GpuQueue,
        load: Callable[[str], Any],
        *,
        capacity: int,
        needs_nothing: Callable[[Any], bool] = lambda loaded: False,
    ) -> None:
        self.gpu_queue = gpu_queue
        self.load = load
        self.capacity = max(1, capacity)
        self.needs_nothing = needs_nothing
        self.lock = threading.Lock()  # every use of the channel and its messages
        self.changed = threading.Condition()  # ready and loading: under this
        self.ready: deque[Ahead] = deque()
        self.loading = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpu-prefetch", daemon=True)
        self._connection: Any = None
        self._bound: Any = None

    def __enter__(self) -> Prefetcher:
        self._connection = self.gpu_queue.app.connection_for_read()
        self._bound = Queue(self.gpu_queue.queue)(self._connection.default_channel)
        return self

    def start(self) -> None:
        """Begin claiming (in its own thread) up to ``capacity`` jobs ahead."""
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        with self.lock:
            if self.ready:
                log.info("returning %d prefetched jobs to the queue", len(self.ready))
                self.ready.clear()
            if self._connection is not None:
                self._connection.release()  # closing the channel restores its unacknowledged messages
                self._connection = None

    def held(self) -> set[str]:
        """Jobs loaded and not taken: a second message for one of them is acknowledged as a
        duplicate. One for a job that is generating now is loaded like any other, and is found
        ended (``nothing to do``) when its turn comes, since batches run one after the other."""
        with self.changed:
            return {ahead.claim.job_id for ahead in self.ready}

    def take(self, limit: int) -> list[Ahead]:
        """Up to ``limit`` loaded jobs, at once (none when none is loaded)."""
        with self.changed:
            taken = [self.ready.popleft() for _ in range(min(limit, len(self.ready)))]
            self.changed.notify_all()
            return taken

    def take_waiting(self, limit: int, wait_s: float) -> list[Ahead]:
        """Up to ``limit`` loaded jobs, waiting at most ``wait_s`` while more are being loaded."""
        deadline = time.monotonic() + wait_s
        with self.changed:
            while len(self.ready) < limit and (self.loading or not self.ready) and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(min(left, IDLE_POLL_S * 5))
        return self.take(limit)

    # Settling, from the thread that ran the job.
    def done(self, claim: Claim) -> None:
        with self.lock:
            self.gpu_queue.done(claim)

    def fail(self, claim: Claim, exc: BaseException) -> None:
        with self.lock:
            self.gpu_queue.fail(claim, exc)

    def retry(self, claim: Claim, exc: TransientError, on_give_up: Callable[[Claim, TransientError], None]) -> None:
        with self.lock:
            self.gpu_queue.retry(claim, exc, on_give_up)

    def _room(self) -> int:
        with self.changed:
            return self.capacity - len(self.ready) - self.loading

    def _run(self) -> None:
        while not self.stopping.is_set():
            room = self._room()
            if room <= 0:
                with self.changed:
                    self.changed.wait(IDLE_POLL_S * 5)
                continue
            held = self.held()
            try:
                with self.lock:
                    claims = self.gpu_queue.drain(self._bound, room, 0.0, exclude=held)
            except Exception:  # the broker may blink; the batch in hand goes on
                log.warning("prefetch: cannot claim from the queue; trying again", exc_info=True)
                self.stopping.wait(1.0)
                continue
            if not claims:
                self.stopping.wait(IDLE_POLL_S)
                continue
            self.gpu_queue.announce(claims)
            with self.changed:
                self.loading += len(claims)
            for claim in claims:
                self._load(claim)

    def _load(self, claim: Claim) -> None:
        try:
            loaded = self.load(claim.job_id)
        except Exception:  # load keeps the job's own errors; this is a bug: the job starts as if unloaded
            log.exception("prefetch: job %s could not be loaded ahead", claim.job_id)
            loaded = None
        if loaded is not None and self.needs_nothing(loaded):
            self.done(claim)
        with self.changed:
            self.loading -= 1
            if loaded is None or not self.needs_nothing(loaded):
                self.ready.append(Ahead(claim, loaded))
            self.changed.notify_all()
