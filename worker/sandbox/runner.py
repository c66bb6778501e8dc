"""Running untrusted work (demuxers, decoders) in forked children with a memory limit and a
deadline, so a crash, a hang or a memory blow-up ends that work and never the calling process.

A small fork server, started once per calling process and per ``ChildSetup``, imports the
modules the caller names (so each child starts warm) and forks one child per call. Each child gets limits on memory (data: heap, buffers, stacks), CPU time (a
backstop to the caller's deadline) and core dumps, and dies with the server, which exits with the
caller. The server starts from an environment without secrets, and each child is confined before
it runs its call (``worker.sandbox.confinement``: no new privileges, few files, no network or processes).
Children answer over their own socket: a length-prefixed pickled header (the length bounded before
anything is allocated for it), then NumPy arrays as raw bytes; a child running a generator answers
once per value it yields, then once more with what it returns.
Plain ``os.fork`` from the server, not ``multiprocessing``: callers can be Celery prefork workers
(daemonic billiard processes) and scripts alike, and no caller module is re-imported per child.
This module knows nothing of what runs in the children: the caller passes what to preload and
how an unexpected exception reads to the user.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import io
import json
import logging
import math
import os
import pickle
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Generator, Sequence
from fractions import Fraction
from multiprocessing.connection import wait
from typing import Any, cast

import numpy as np

from common.errors import InvalidMedia, TransientError, VideoQAError
from worker.sandbox import confinement

log = logging.getLogger(__name__)

Call = tuple[Callable[..., Any], tuple[Any, ...]]
# What a call returns: a picklable payload and arrays (sent as raw bytes, not pickled).
Answer = tuple[Any, list[np.ndarray]]

_PR_SET_PDEATHSIG = 1
# Server <-> caller control messages: kind, child pid, length or wait status.
_MESSAGE = struct.Struct("!BiQ")
_LENGTH = struct.Struct("!Q")
_START, _KILL, _STARTED, _EXITED = 1, 2, 3, 4
_SOCKET_BUFFER = 1 << 20
# The largest answer header a child may announce. Headers hold plans and indexes: the index of a
# stream of 500,000 frames (VIDEOQA_MAX_VIDEO_FRAMES' default) pickles to about 3.5 MB.
MAX_HEADER_BYTES = 64 * 1024 * 1024


def _exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclasses.dataclass(frozen=True)
class ChildSetup:
    """What the caller's fork server prepares for its children.

    ``preload``: modules the server imports once, so children fork with them loaded.
    ``describe_error``: turns an unexpected exception raised in a child into the reason the user
    reads (after "the video cannot be decoded: "); a module-level function, as it is pickled by
    name to the server.
    """

    preload: tuple[str, ...] = ()
    describe_error: Callable[[BaseException], str] = _exception_text


# Children of this setup run with nothing preloaded and report exceptions as their type and text.
PLAIN = ChildSetup()


def run_isolated(
    calls: Sequence[Call],
    memory_bytes: int,
    deadline_s: float,
    *,
    answer_types: Collection[type] = (),
    setup: ChildSetup = PLAIN,
) -> list[Answer]:
    """Run each ``fn(*args) -> (payload, arrays)`` in its own child, all at once; their answers."""
    deadline = time.monotonic() + deadline_s
    return run_until(calls, memory_bytes, deadline, deadline_s, answer_types=answer_types, setup=setup)[0]


def run_until(
    calls: Sequence[Call],
    memory_bytes: int,
    deadline: float,
    deadline_s: float,
    *,
    answer_types: Collection[type] = (),
    setup: ChildSetup = PLAIN,
) -> tuple[list[Answer], list[int]]:
    """``run_isolated`` against an absolute ``deadline`` (monotonic clock); also each child's peak
    resident set in bytes. Any child's failure fails them all (the others are killed)."""
    with Session(memory_bytes, deadline, deadline_s, answer_types=answer_types, setup=setup) as session:
        children = [session.start(fn, args) for fn, args in calls]
        session.finish()
    return [child.answers[-1] for child in children], [child.peak for child in children]


class Session:
    """Children started one after another against one deadline and one memory limit each.

    A call may be a generator function: what it yields reaches the caller at once
    (``next_answer``) while the child goes on, and what it returns is its last answer. That lets
    a child hand over a plan and start on its own share of it while the caller starts the rest.
    Any child's failure fails the session (the others are killed when it closes).

    Children parse hostile files, so their answers are data, never code: only builtin values, the
    service's errors, ``Fraction`` and the classes in ``answer_types`` are rebuilt from them, and
    an answer's arrays may not add up to more than a child's memory limit.
    """

    def __init__(
        self,
        memory_bytes: int,
        deadline: float,
        deadline_s: float,
        *,
        answer_types: Collection[type] = (),
        setup: ChildSetup = PLAIN,
    ) -> None:
        self.server = _server(setup)
        self.memory_bytes = memory_bytes
        self.allowed = _allowed_classes(answer_types)
        self.deadline, self.deadline_s = deadline, deadline_s
        self.cpu_s = int(max(1.0, deadline - time.monotonic()) * available_cores()) + 1
        self.children: list[_Child] = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.close()

    def start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Child:
        try:
            child = _Child(self.server, fn, args, self.memory_bytes, self.cpu_s, self.allowed)
        except (OSError, EOFError):
            # The server itself died (killed from outside): the next call starts a new one.
            raise TransientError("the decode server stopped; the job will be retried") from None
        self.children.append(child)
        return child

    def next_answer(self, child: _Child) -> Answer:
        """The first answer of ``child`` not taken yet (waiting for it as long as the deadline allows)."""
        self._wait_until(lambda: child.taken < len(child.answers))
        child.taken += 1
        return child.answers[child.taken - 1]

    def finish(self) -> None:
        """Wait until every child has given its last answer."""
        self._wait_until(lambda: all(child.finished for child in self.children))

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise InvalidMedia(f"decoding took longer than {self.deadline_s:g} s (VIDEOQA_DECODE_TIMEOUT_S)")
            pending = {child.fileno(): child for child in self.children if not child.finished}
            for fd in wait(list(pending), timeout=remaining):
                child = pending[cast(int, fd)]  # wait() gives back the file numbers it was given
                try:
                    child.receive()
                except (EOFError, OSError):
                    raise InvalidMedia(child.failure()) from None
                if child.error is not None:
                    kind, message = child.error
                    raise kind(message)


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def warm_up(setup: ChildSetup = PLAIN) -> dict[str, Any]:
    """Start the fork server of ``setup`` now rather than on the first call; log what confines its
    children (a warning when they run without the seccomp filter) and return it."""
    ((state, _),) = run_isolated([(confinement.report, ())], 256 * 1024 * 1024, 60, setup=setup)
    if state["seccomp_filter"]:
        log.info(
            "decode sandbox: seccomp filter on (no network, no new processes), no new privileges%s",
            f"; this libseccomp leaves unfiltered: {', '.join(state['unfiltered_calls'])}"
            if state["unfiltered_calls"]
            else "",
        )
    else:
        log.warning(
            "decode sandbox: children run WITHOUT the seccomp filter, so a subverted decoder keeps network "
            "access: %s (docs/sandbox.md)",
            state["without_seccomp"],
        )
    return state


# --- the caller's side --------------------------------------------------------------------------


class _Server:
    """The caller's handle on its fork server."""

    def __init__(self, setup: ChildSetup) -> None:
        # The children must not read this process's secrets in /proc either.
        confinement.protect_caller()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        bootstrap = (
            "import sys; sys.path[:0] = __import__('json').loads(sys.argv[1]); "
            "from worker.sandbox.runner import serve; serve(int(sys.argv[2]), bytes.fromhex(sys.argv[3]))"
        )
        # The setup is the caller's own (module names and a function named by reference), never
        # anything from the media.
        setup_bytes = pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL).hex()
        self.process = subprocess.Popen(
            [sys.executable, "-c", bootstrap, json.dumps(sys.path), str(theirs.fileno()), setup_bytes],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=confinement.server_environment(os.environ),
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        # Children whose exit may still matter to a caller, and the exits seen of those.
        self.watching: set[int] = set()
        self.exits: dict[int, int] = {}
        self.pid = os.getpid()

    def start(self, payload: bytes, channel: socket.socket) -> int:
        with self.lock:
            socket.send_fds(self.sock, [_MESSAGE.pack(_START, 0, len(payload))], [channel.fileno()])
            self.sock.sendall(payload)
            while True:
                kind, pid, value = self._read()
                if kind == _STARTED:
                    self.watching.add(pid)
                    return pid
                self._exited(pid, value)

    def kill(self, pid: int) -> None:
        with self.lock:
            # The server kills only a child it has not reaped yet: never a recycled pid.
            self.sock.sendall(_MESSAGE.pack(_KILL, pid, 0))

    def exit_status(self, pid: int, timeout_s: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while pid not in self.exits:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                    return None
                kind, other, value = self._read()
                if kind == _EXITED:
                    self._exited(other, value)
            return self.exits.pop(pid)

    def forget(self, pid: int) -> None:
        with self.lock:
            self.watching.discard(pid)
            self.exits.pop(pid, None)

    def _exited(self, pid: int, status: int) -> None:
        if pid in self.watching:
            self.exits[pid] = status

    def _read(self) -> tuple[int, int, int]:
        data = _recv_exactly(self.sock, _MESSAGE.size)
        kind, pid, value = _MESSAGE.unpack(data)
        return kind, pid, value

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None


_SERVERS: dict[ChildSetup, _Server] = {}
_SERVER_LOCK = threading.Lock()


def _server(setup: ChildSetup) -> _Server:
    with _SERVER_LOCK:
        server = _SERVERS.get(setup)
        if server is None or not server.alive():
            server = _SERVERS[setup] = _Server(setup)
        return server


class _Child:
    def __init__(
        self,
        server: _Server,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        memory_bytes: int,
        cpu_s: int,
        allowed: frozenset[tuple[str, str]],
    ) -> None:
        self.server = server
        self.memory_bytes = memory_bytes
        self.allowed = allowed
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Frames are megabytes: large buffers mean far fewer switches between the processes.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        payload = pickle.dumps((fn, args, memory_bytes, cpu_s), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.pid = server.start(payload, theirs)
        finally:
            theirs.close()
        self.sock = ours
        self.answers: list[Answer] = []
        self.taken = 0
        self.peak = 0
        self.finished = False
        self.error: tuple[type[VideoQAError], str] | None = None
        self._header: tuple[Any, ...] | None = None
        self._arrays: list[np.ndarray] = []
        self._block, self._offset = _EMPTY, 0
        self._received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> None:
        """Read the next piece of the child's next answer: its header, or one of its arrays."""
        if self._header is None:
            (size,) = _LENGTH.unpack(_recv_exactly(self.sock, _LENGTH.size))
            # Checked before a byte is allocated for it: the length is the child's word only.
            if size > min(MAX_HEADER_BYTES, self.memory_bytes):
                self._refuse(f"the decoder's answer was refused: its header claims {size} bytes")
                return
            data = _recv_exactly(self.sock, size)
            try:
                header = _checked_header(_AnswerUnpickler(io.BytesIO(data), self.allowed).load())
                total = sum(_nbytes(spec) for spec in header[2]) if header[0] != "error" else 0
            except Exception as exc:  # noqa: BLE001 - whatever a subverted child sends fails its job only
                self._refuse(f"the decoder's answer was refused: {type(exc).__name__}: {exc}")
                return
            if header[0] == "error":
                self.error = (header[1], header[2])
                self.finished = True
                return
            # Counted over all the child's answers: many answers must not add up to more either.
            self._received += total
            if self._received > self.memory_bytes:
                self._refuse(f"the decoder's answers claim {self._received} bytes, more than its memory limit")
                return
            self._header, self._arrays = header, []
            # One block for all the answer's arrays: a block this large is backed by huge pages
            # (NumPy asks for them from 4 MiB on), a fraction of the page faults of one array each.
            self._block = np.empty(total, dtype=np.uint8)
            self._offset = 0
        else:
            shape, dtype = self._header[2][len(self._arrays)]
            size = _nbytes((shape, dtype))
            # Straight into the block: one copy out of the socket, none after.
            part = self._block[self._offset : self._offset + size]
            _recv_into(self.sock, part.data)
            self._arrays.append(part.view(np.dtype(dtype)).reshape(shape))
            self._offset += size
        if len(self._arrays) == len(self._header[2]):
            kind, payload, _, peak = self._header
            self.answers.append((payload, self._arrays))
            self._header, self._block = None, _EMPTY
            if kind == "last":
                self.finished, self.peak = True, peak

    def _refuse(self, message: str) -> None:
        self.error = (InvalidMedia, message)
        self.finished = True

    def failure(self) -> str:
        status = self.server.exit_status(self.pid)
        if status is None:
            return "the decoder stopped answering"
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            name = signal.Signals(-code).name
            if name in ("SIGKILL", "SIGXCPU"):
                return f"the decoder was killed ({name}: out of memory or CPU time)"
            return f"the decoder crashed ({name})"
        return f"the decoder exited unexpectedly (status {code})"

    def close(self) -> None:
        if not self.finished:
            with contextlib.suppress(OSError):
                self.server.kill(self.pid)
        self.sock.close()
        self.server.forget(self.pid)


_EMPTY = np.empty(0, dtype=np.uint8)


class _AnswerUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} may not appear in an answer")
        return super().find_class(module, name)


def _checked_header(header: Any) -> tuple[Any, ...]:
    """``header`` if it has the shape ``_send`` gives headers, else ValueError."""
    if isinstance(header, tuple) and header and header[0] == "error":
        if (
            len(header) == 3
            and isinstance(header[1], type)
            and issubclass(header[1], VideoQAError)
            and isinstance(header[2], str)
        ):
            return header
    elif isinstance(header, tuple) and len(header) == 4 and header[0] in ("more", "last"):
        specs, peak = header[2], header[3]
        if (
            isinstance(specs, list)
            and all(isinstance(spec, tuple) and len(spec) == 2 for spec in specs)
            and isinstance(peak, int)
        ):
            return header
    raise ValueError("not an answer header")


def _allowed_classes(answer_types: Collection[type]) -> frozenset[tuple[str, str]]:
    errors: list[type] = [VideoQAError]
    for kind in errors:
        errors.extend(kind.__subclasses__())
    return frozenset((kind.__module__, kind.__qualname__) for kind in [Fraction, *errors, *answer_types])


def _nbytes(spec: tuple[tuple[int, ...], str]) -> int:
    shape, dtype = spec
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"not an array shape: {shape!r}")
    kind = np.dtype(dtype)
    if kind.hasobject:
        # Raw bytes read as object pointers would be addresses the child chose.
        raise ValueError(f"not an array of plain values: {dtype!r}")
    # Python integers: a forged shape cannot overflow into a small number.
    return math.prod(shape) * kind.itemsize


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    _recv_into(sock, memoryview(data))
    return bytes(data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:], len(view) - received)
        if not count:
            raise EOFError("the other side hung up")
        received += count


# --- the fork server ----------------------------------------------------------------------------


# The fork server's setup; its children inherit it.
_SETUP = PLAIN


def serve(fd: int, setup_bytes: bytes) -> None:
    """The fork server's loop: fork a child per request, report exits, stop with the caller."""
    global _SETUP
    _SETUP = pickle.loads(setup_bytes)
    # What every child needs, imported once here.
    for module in _SETUP.preload:
        importlib.import_module(module)

    confined = confinement.prepare()
    user_tasks = confinement.UserTasks()

    sock = socket.socket(fileno=fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller; we follow it out
    live: set[int] = set()
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
        while live:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            live.discard(pid)
            sock.sendall(_MESSAGE.pack(_EXITED, pid, status))
        if sock.fileno() not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MESSAGE.size, 1)
            if len(data) < _MESSAGE.size:
                data += _recv_exactly(sock, _MESSAGE.size - len(data))
        except (EOFError, OSError):
            data, fds = b"", []
        if not data:
            # The caller is gone: so are we, and the children with us.
            return
        kind, pid, value = _MESSAGE.unpack(data)
        if kind == _KILL:
            if pid in live:
                os.kill(pid, signal.SIGKILL)
            continue
        payload = _recv_exactly(sock, value)
        tasks = user_tasks.current()
        child = os.fork()
        if child == 0:
            _child(fds[0], payload, (confined, tasks), closing=[sock.fileno(), wake_read, wake_write])
        os.close(fds[0])
        live.add(child)
        sock.sendall(_MESSAGE.pack(_STARTED, child, 0))


def _child(fd: int, payload: bytes, confined: tuple[confinement.Prepared, int], closing: list[int]) -> None:
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for other in closing:
            os.close(other)
        if sys.platform == "linux":
            # Die with the fork server (and so with the caller).
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        conn = socket.socket(fileno=fd)
        try:
            fn, args, memory_bytes, cpu_s = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as its bug, not the media's
            _send(conn, ("error", VideoQAError, f"the sandboxed call cannot be loaded: {exc!r}"))
            return
        # Data, not address space: threads reserve large unused ranges (malloc arenas), while
        # heap, frame buffers and stacks all count here.
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            confinement.confine(*confined)
        except (OSError, ValueError) as exc:
            _send(conn, ("error", VideoQAError, f"the decode sandbox cannot be set up: {exc}"))
            return
        _answer(conn, fn, args)
    finally:
        os._exit(0)


def _answer(conn: socket.socket, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
        if isinstance(result, Generator):
            while True:
                try:
                    payload, arrays = next(result)
                except StopIteration as stop:
                    payload, arrays = cast("tuple[Any, Any]", stop.value)
                    break
                _send_answer(conn, "more", payload, arrays)
        else:
            payload, arrays = result
    except VideoQAError as exc:
        _send(conn, ("error", type(exc), exc.message))
        return
    except MemoryError:
        _send(conn, ("error", InvalidMedia, "the video needs more memory to decode than the limit allows"))
        return
    except Exception as exc:  # noqa: BLE001 - a decoder bug must end the job, not the worker
        _send(conn, ("error", InvalidMedia, f"the video cannot be decoded: {_SETUP.describe_error(exc)}"))
        return
    _send_answer(conn, "last", payload, arrays)


def _send_answer(conn: socket.socket, kind: str, payload: Any, arrays: list[np.ndarray]) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _send(conn, (kind, payload, [(a.shape, a.dtype.str) for a in arrays], peak))
    for array in arrays:
        conn.sendall(np.ascontiguousarray(array).reshape(-1).data)


def _send(conn: socket.socket, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_LENGTH.pack(len(data)) + data)
