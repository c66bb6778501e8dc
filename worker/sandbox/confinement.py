"""What a decode child may not do: the security side of ``worker.sandbox.runner``.

Children parse hostile files, so a decoder bug must not hand its author more than the file itself:
they start from an environment that holds no secret (an allowlist, below), may not gain privileges
(``PR_SET_NO_NEW_PRIVS``), open few files and start few threads, and, where Linux and libseccomp
allow, make no network connection and start, read or signal no other process (a seccomp filter
through ``pyseccomp``).
The worker that starts them hides its own environment and memory from them (``protect_caller``).
docs/sandbox.md says what holds on which platform.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Only these reach the fork server and its children: what Python, glibc, FFmpeg and the math
# libraries read, none of which carries a secret. Everything else (VIDEOQA_*, AWS_*, passwords,
# tokens) stays with the worker.
ENVIRONMENT_ALLOWLIST = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONHOME",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "LD_LIBRARY_PATH",
        "GLIBC_TUNABLES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    }
)
# Locale variables, by prefix.
_ALLOWED_PREFIXES = ("LC_",)

# A decoding child holds its answer socket, the media file (one per decoder thread, at most
# eight), and what Python opens while it imports lazily: 64 leaves ample room.
OPEN_FILES = 64
# Threads a child may add to what its user already runs. A decode child peaks near 20 (a thread
# pool of up to eight decoders, FFmpeg's frame threads, Python's main thread); the rest is room
# for the user's other processes that start while the child runs, since the kernel counts them
# all against this one limit.
THREAD_ALLOWANCE = 256

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_THREAD = 0x00010000
# Where clone()'s flags are its first argument (s390 puts the stack first).
_CLONE_FLAGS_FIRST = ("x86_64", "aarch64", "arm64")
# Denied with EPERM (a clean OSError in Python), not a kill: a decoder that tries one fails its
# job with a message, as any other decoding error does.
_DENIED = (
    # Network and local sockets: the child needs none beyond the answer socket it inherits.
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    # New programs and processes (threads stay allowed: see ``_filter``).
    "execve",
    "execveat",
    "fork",
    "vfork",
    # Other processes: their memory, descriptors and signals (see also ``_SIGNALS``).
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "kcmp",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    # The kernel's larger attack surfaces.
    "unshare",
    "setns",
    "mount",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
)
# Signals, to the child itself only (abort() and Python's own use), never to the worker or
# another job's decoder; their first argument is the target process.
_SIGNALS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# Answered "not implemented", so callers fall back: glibc's threads then use clone(), which the
# filter can inspect, and io_uring (whose requests seccomp cannot see) is never set up.
_NOT_IMPLEMENTED = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")


def server_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The fork server's environment: the allowlisted variables of ``base``, with glibc's malloc
    asking for transparent huge pages unless the operator chose otherwise (glibc 2.35 and later;
    others ignore it). Every child allocates its decoded frames afresh, megabytes each: huge pages
    cut the page faults that cost as much as the copying."""
    env = {
        name: value
        for name, value in base.items()
        if name in ENVIRONMENT_ALLOWLIST or name.startswith(_ALLOWED_PREFIXES)
    }
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join([*tunables, "glibc.malloc.hugetlb=1"])
    return env


def protect_caller() -> None:
    """Make this process's environment and memory unreadable to other processes of its user
    (``/proc/PID/environ``, ``/proc/PID/mem``, ptrace), decode children included. It also stops
    this process's core dumps, which would hold the same secrets."""
    if sys.platform == "linux":
        _prctl(_PR_SET_DUMPABLE, 0)


@dataclass(frozen=True)
class Prepared:
    """Built once in the fork server, applied in each child. ``missing`` says why a child runs
    without the seccomp filter (no Linux, no binding, no libseccomp); None when it has one.
    ``unknown``: system calls this libseccomp does not know, left unfiltered."""

    seccomp: Any
    missing: str | None
    unknown: tuple[str, ...] = ()


def prepare() -> Prepared:
    """The seccomp filter every child loads, or why there is none."""
    if sys.platform != "linux":
        return Prepared(None, f"seccomp needs Linux (this is {sys.platform})")
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:
        # pyseccomp raises RuntimeError when libseccomp itself is missing.
        return Prepared(None, f"the seccomp binding cannot load: {exc}")
    try:
        rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        unknown = _add_rules(pyseccomp, rules)
    except (OSError, RuntimeError, ValueError) as exc:
        return Prepared(None, f"the seccomp filter cannot be built: {exc}")
    return Prepared(rules, None, unknown)


def _add_rules(seccomp: Any, rules: Any) -> tuple[str, ...]:
    """The rules every child shares; the names of the calls this libseccomp does not know."""
    unknown = []
    denied: list[tuple[int, str, tuple[Any, ...]]] = [(errno.EPERM, name, ()) for name in _DENIED]
    if platform.machine() in _CLONE_FLAGS_FIRST:
        # clone() starting a process, not a thread.
        denied.append((errno.EPERM, "clone", (seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0),)))
    denied += [(errno.ENOSYS, name, ()) for name in _NOT_IMPLEMENTED]
    for code, name, conditions in denied:
        try:
            rules.add_rule(seccomp.ERRNO(code), name, *conditions)
        except OSError:
            # An older libseccomp than the call: the rest of the filter still stands.
            unknown.append(name)
    return tuple(unknown)


class UserTasks:
    """The fork server's count of its user's processes and threads, taken at most once a second:
    a count for every child would cost each a few milliseconds, for a limit with room to spare."""

    def __init__(self, max_age_s: float = 1.0) -> None:
        self.max_age_s = max_age_s
        self.taken_at = -math.inf
        self.count = 0

    def current(self) -> int:
        if time.monotonic() - self.taken_at > self.max_age_s:
            self.count, self.taken_at = _user_tasks(), time.monotonic()
        return self.count


# Why this child runs without its seccomp filter (None once it has it), and the calls it leaves out.
_unconfined: str | None = "not confined yet"
_unknown: tuple[str, ...] = ()


def confine(prepared: Prepared, user_tasks: int) -> None:
    """In a child, before it reads the media: no new privileges, few files, a bounded number of
    threads (``user_tasks``: what the user runs now), and the seccomp filter where there is one."""
    global _unconfined, _unknown
    if sys.platform == "linux":
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _lower_limit(resource.RLIMIT_NOFILE, OPEN_FILES)
    if hasattr(resource, "RLIMIT_NPROC") and user_tasks:
        # The kernel counts every process and thread of the user, not of this child: the limit
        # is what the user runs now plus the allowance. (It never binds root.)
        _lower_limit(resource.RLIMIT_NPROC, user_tasks + THREAD_ALLOWANCE)
    if prepared.seccomp is None:
        _unconfined = prepared.missing
        return
    import pyseccomp  # loaded already: prepare() built the filter with it

    try:
        # This child's own copy of the filter: only now is its pid known.
        for name in _SIGNALS:
            prepared.seccomp.add_rule(pyseccomp.ERRNO(errno.EPERM), name, pyseccomp.Arg(0, pyseccomp.NE, os.getpid()))
        prepared.seccomp.load()
    except OSError as exc:
        # The kernel lacks seccomp filters, or a container's own profile refuses them.
        _unconfined = f"the kernel refused the seccomp filter: {exc}"
    else:
        _unconfined, _unknown = None, prepared.unknown


def report() -> tuple[dict[str, Any], list[Any]]:
    """What confines the child that runs this (an answer for ``worker.sandbox.runner``)."""
    status: dict[str, str] = {}
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as handle:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)
    return {
        "seccomp_filter": status.get("Seccomp", "").strip() == "2",
        "without_seccomp": _unconfined,
        "unfiltered_calls": list(_unknown),
        "no_new_privileges": status.get("NoNewPrivs", "").strip() == "1",
        "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "environment": sorted(os.environ),
    }, []


def _lower_limit(kind: int, value: int) -> None:
    # Never above the hard limit the worker was given: only root may raise that.
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _user_tasks() -> int:
    """Processes and threads of this user that /proc shows. Two stats a process: reading each
    status file costs several times more, on every child. Those of other PID namespaces (other
    containers) and non-dumpable ones (shown as root's) are missed: ``THREAD_ALLOWANCE`` leaves
    room for them."""
    uid, total = os.getuid(), 0
    if not os.path.isdir("/proc"):
        return 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                # A directory's links: its subdirectories (one per thread) plus "." and "..".
                total += os.stat(f"/proc/{entry.name}/task").st_nlink - 2
        except OSError:
            continue  # gone meanwhile
    return total


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")
