"""The decode sandbox as a security boundary: what a subverted decoder could try from inside a
child of the real fork server (read secrets, connect out, start or signal processes, make the
caller allocate or read pointers). Still images: tests/test_still_images.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from common.errors import InvalidMedia
from worker.sandbox import runner as sandbox
from worker.sandbox.confinement import ENVIRONMENT_ALLOWLIST, OPEN_FILES, THREAD_ALLOWANCE, server_environment
from worker.sandbox.runner import run_isolated

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the boundary is built from Linux features"),
    pytest.mark.service,  # the sandbox's own server process, and commands of the tests' own
]

MEMORY = 512 * 1024 * 1024
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-key",
    "VIDEOQA_REDIS_URL": "redis://:hunter2-password@127.0.0.1:6379/0",
    "MINIO_ROOT_PASSWORD": "minio-root-s3cr3t",
    "HF_TOKEN": "hf_s3cr3t_token",
}
ROOT = Path(__file__).resolve().parent.parent


# --- secrets ----------------------------------------------------------------------------------


def _environment(caller_pid: int) -> tuple[dict[str, object], list[np.ndarray]]:
    """Runs in a child: everything a decoder could learn of environments."""
    try:
        caller = Path(f"/proc/{caller_pid}/environ").read_bytes().decode(errors="replace")
    except OSError as exc:
        caller = f"refused: {type(exc).__name__}"
    return {
        "own": Path("/proc/self/environ").read_bytes().decode(errors="replace"),
        "os.environ": dict(os.environ),
        "caller": caller,
    }, []


_CALLER = """
import json, os, sys
from worker.sandbox.runner import run_isolated
import tests.test_sandbox_boundary as here
function = getattr(here, sys.argv[1])
((found, _),) = run_isolated([(function, (os.getpid(),))], 256 * 1024 * 1024, 60)
print(json.dumps({"caller_has_them": dict(os.environ), "child": found}))
"""


def _run_as_the_worker_user(function: str) -> dict:
    """``function(caller pid)`` in a child of a caller with secrets in its environment, as the CPU
    worker has them in compose, and with no capabilities, as the worker image's own user (root's
    would read any process's /proc and lift the process limit)."""
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _CALLER, function]
    if os.getuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root needs util-linux's setpriv to shed the capabilities")
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *argv]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_child_sees_no_secret_of_the_worker_environment() -> None:
    seen = _run_as_the_worker_user("_environment")
    assert all(seen["caller_has_them"][name] == value for name, value in SECRETS.items())
    child = seen["child"]
    for value in SECRETS.values():
        assert value not in child["own"]
        assert value not in json.dumps(child["os.environ"])
        assert value not in child["caller"]
    assert set(child["os.environ"]) <= ENVIRONMENT_ALLOWLIST | {n for n in child["os.environ"] if n.startswith("LC_")}
    assert child["caller"].startswith("refused")


def _exhaust(_: int) -> tuple[dict[str, int], list[np.ndarray]]:
    """Runs in a child: its process limit against what the user runs, the threads a decoder needs,
    and as many open files as it is let have (up to a bound)."""
    import resource

    user_tasks = sum(1 for _ in Path("/proc").glob("[0-9]*/task/[0-9]*"))
    # Starting threads up to the limit is no test: near it, a thread's start can fail for memory
    # (the child's data limit) in a way that blocks its starter. A decoder needs a few dozen.
    threading.stack_size(256 * 1024)
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(24)]
    for thread in threads:
        thread.start()
    stop.set()
    for thread in threads:
        thread.join()
    files = []
    try:
        for _ in range(1000):
            files.append(open(os.devnull))  # noqa: SIM115 - held open on purpose
    except OSError:
        pass
    return {
        "threads": len(threads),
        "files": len(files),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
        "user_tasks": user_tasks,
    }, []


def test_a_child_has_few_files_and_threads_yet_enough_to_decode() -> None:
    child = _run_as_the_worker_user("_exhaust")["child"]
    # Decoders use up to 8 threads (and FFmpeg's frame threads): far below the limit.
    assert child["threads"] == 24
    assert 32 <= child["files"] < OPEN_FILES
    # The process limit is what the user ran when the child started plus a bounded allowance
    # (other processes of the user come and go meanwhile, hence the margin).
    assert child["nproc"] != resource.RLIM_INFINITY
    assert child["nproc"] - child["user_tasks"] <= 2 * THREAD_ALLOWANCE


def test_the_server_environment_keeps_only_harmless_variables_and_the_callers_tunables() -> None:
    harmless = {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
        "PATH": "/bin",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }
    env = server_environment({**harmless, **SECRETS, "REDIS_PASSWORD": "x", "GITHUB_TOKEN": "y"})
    assert env == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        "PATH": "/bin",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }
    # An operator's own choice stands.
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert server_environment(chosen)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_children_run_without_new_privileges_under_the_seccomp_filter() -> None:
    state = sandbox.warm_up()
    assert state["seccomp_filter"], state["without_seccomp"]
    assert state["without_seccomp"] is None
    assert state["no_new_privileges"]
    assert state["open_files"] == OPEN_FILES
    assert state["unfiltered_calls"] == []
    assert set(state["environment"]) <= ENVIRONMENT_ALLOWLIST | {n for n in state["environment"] if n.startswith("LC_")}


_WARM_UP = """
import json, logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from worker.sandbox import runner as sandbox
print(json.dumps(sandbox.warm_up()))
"""


def test_without_the_seccomp_binding_the_worker_warns_once_and_the_rest_holds(tmp_path: Path) -> None:
    # libseccomp cannot be taken off this machine: a module of the binding's name that fails to
    # load, as pyseccomp does without the library, stands in for a platform without it.
    (tmp_path / "pyseccomp.py").write_text('raise RuntimeError("Unable to find libseccomp")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-c", _WARM_UP], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.splitlines()[-1])
    assert not state["seccomp_filter"]
    assert state["without_seccomp"] == "the seccomp binding cannot load: Unable to find libseccomp"
    assert state["no_new_privileges"] and state["open_files"] == OPEN_FILES
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "WITHOUT the seccomp filter" in warnings[0], done.stderr
    assert "Unable to find libseccomp" in warnings[0]


# --- network and processes ----------------------------------------------------------------------


def _try_to_connect(port: int, unix_path: str) -> tuple[dict[str, str], list[np.ndarray]]:
    outcome = {}
    for name, family, address in (("tcp", socket.AF_INET, ("127.0.0.1", port)), ("unix", socket.AF_UNIX, unix_path)):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.connect(address)
                outcome[name] = "connected"
        except OSError as exc:
            outcome[name] = type(exc).__name__
    return outcome, []


def test_a_childs_connect_to_a_listening_socket_fails(tmp_path: Path) -> None:
    unix_path = str(tmp_path / "listening.sock")
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(unix_path)
        unix.listen()
        ((outcome, _),) = run_isolated([(_try_to_connect, (tcp.getsockname()[1], unix_path))], MEMORY, 60)
        assert outcome == {"tcp": "PermissionError", "unix": "PermissionError"}
        # Nothing reached either listener.
        for listener in (tcp, unix):
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()


def _try_to_start_processes() -> tuple[dict[str, str], list[np.ndarray]]:
    outcome = {}
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        outcome["fork"] = "started"
    except OSError as exc:
        outcome["fork"] = type(exc).__name__
    try:
        subprocess.run(["true"], check=True)
        outcome["subprocess"] = "started"
    except OSError as exc:
        outcome["subprocess"] = type(exc).__name__
    # Threads, which FFmpeg's decoders use, still start.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcome["threads"] = str(sum(pool.map(lambda n: n, range(8))))
    return outcome, []


def test_a_child_starts_no_process_but_still_runs_threads() -> None:
    ((outcome, _),) = run_isolated([(_try_to_start_processes, ())], MEMORY, 60)
    assert outcome == {"fork": "PermissionError", "subprocess": "PermissionError", "threads": "28"}


def _try_to_signal(pid: int) -> tuple[dict[str, str], list[np.ndarray]]:
    outcome = {}
    try:
        os.kill(pid, signal.SIGKILL)
        outcome["other"] = "signalled"
    except OSError as exc:
        outcome["other"] = type(exc).__name__
    # Its own signals still work: abort() and Python's handlers rely on them.
    signal.signal(signal.SIGUSR1, lambda *_: outcome.__setitem__("self", "received"))
    os.kill(os.getpid(), signal.SIGUSR1)
    return outcome, []


def test_a_child_signals_no_other_process() -> None:
    """A subverted decoder could otherwise kill its worker (or another job's decoder): same user."""
    with subprocess.Popen(["sleep", "60"]) as bystander:
        try:
            ((outcome, _),) = run_isolated([(_try_to_signal, (bystander.pid,))], MEMORY, 60)
            assert outcome == {"other": "PermissionError", "self": "received"}
            assert bystander.poll() is None
        finally:
            bystander.kill()


# --- the answer protocol --------------------------------------------------------------------------


def _forge_a_huge_header() -> tuple[None, list[np.ndarray]]:
    # The answer socket is the child's only socket: announce a 1 GiB header, send none of it.
    for fd in map(int, os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.write(fd, struct.pack("!Q", 1 << 30))
    time.sleep(60)
    return None, []


def test_a_forged_huge_length_is_refused_without_allocating_it() -> None:
    sandbox.warm_up()  # the server's start is not the caller's allocation
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMedia, match="answer was refused: its header claims 1073741824 bytes"):
            run_isolated([(_forge_a_huge_header, ())], 2 * 1024**3, 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def _forge_an_object_array() -> tuple[None, list[np.ndarray]]:
    # A well-formed header for one array of Python objects: eight bytes the caller would read as
    # a pointer.
    header = pickle.dumps(("last", None, [((1,), "|O")], 0))
    for fd in map(int, os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.write(fd, struct.pack("!Q", len(header)) + header + struct.pack("!Q", 0xDEADBEEF))
    time.sleep(60)
    return None, []


def test_an_answer_of_object_arrays_is_refused() -> None:
    with pytest.raises(InvalidMedia, match="answer was refused: ValueError: not an array of plain values"):
        run_isolated([(_forge_an_object_array, ())], MEMORY, 30)
