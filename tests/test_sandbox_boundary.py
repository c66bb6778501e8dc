"""The decode sandbox as a security boundary: what a subverted decoder could try from inside a
child of the real fork server (read secrets, connect out, start processes, make the caller
allocate), and still images decoded there with a pixel limit."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from common.errors import InvalidMedia, MediaTooLarge
from common.settings import load_settings
from tests.conftest import BUCKET, RunningService
from worker import sandbox
from worker.confinement import ENVIRONMENT_ALLOWLIST, OPEN_FILES, server_environment
from worker.geometry import FrameGeometry, load_geometry
from worker.sandbox import run_isolated
from worker.still_image import decode_image

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the boundary is built from Linux features")

MEMORY = 512 * 1024 * 1024
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-key",
    "VIDEOQA_REDIS_URL": "redis://:hunter2-password@127.0.0.1:6379/0",
    "MINIO_ROOT_PASSWORD": "minio-root-s3cr3t",
    "HF_TOKEN": "hf_s3cr3t_token",
}
ROOT = Path(__file__).resolve().parent.parent
GEOMETRY = FrameGeometry(96, 64, Image.Resampling.BICUBIC)


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
from worker.sandbox import run_isolated
import tests.test_sandbox_boundary as here
function = getattr(here, sys.argv[1])
((found, _),) = run_isolated([(function, (os.getpid(),))], 256 * 1024 * 1024, 60)
print(json.dumps({"caller_has_them": dict(os.environ), "child": found}))
"""


def _run_as_the_worker_user(function: str) -> dict:  # type: ignore[type-arg]
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
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


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
    """Runs in a child: as many threads and open files as it is let have (up to a bound)."""
    threading.stack_size(256 * 1024)  # so the memory limit is not what stops them
    stop, threads, files = threading.Event(), [], []
    try:
        for _ in range(1000):
            threads.append(threading.Thread(target=stop.wait))
            threads[-1].start()
    except RuntimeError:  # "can't start new thread"
        threads.pop()
    stop.set()
    for thread in threads:
        thread.join()
    try:
        for _ in range(1000):
            files.append(open(os.devnull))  # noqa: SIM115 - held open on purpose
    except OSError:
        pass
    return {"threads": len(threads), "files": len(files)}, []


def test_a_child_has_few_files_and_threads_yet_enough_to_decode() -> None:
    child = _run_as_the_worker_user("_exhaust")["child"]
    # Decoders use up to 8 threads (and FFmpeg's frame threads): far below the limit.
    assert 20 <= child["threads"] < 1000
    assert 32 <= child["files"] < OPEN_FILES


def test_the_server_environment_keeps_only_harmless_variables_and_the_callers_tunables() -> None:
    harmless = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
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
from worker import sandbox
print(json.dumps(sandbox.warm_up()))
"""


def test_without_the_seccomp_binding_the_worker_warns_once_and_the_rest_holds(tmp_path: Path) -> None:
    # libseccomp cannot be taken off this machine: a module of the binding's name that fails to
    # load, as pyseccomp does without the library, stands in for a platform without it.
    (tmp_path / "pyseccomp.py").write_text('raise RuntimeError("Unable to find libseccomp")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run([sys.executable, "-c", _WARM_UP], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
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


# --- still images ---------------------------------------------------------------------------------


def _png_bomb(path: Path, side: int = 50_000) -> Path:
    """A valid 1-bit PNG of side x side pixels, all black: a few hundred KB on disk, 2.5 G pixels
    (7.5 GB as RGB) once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte, then the row's bits
    rows = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack("!IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _gif_bomb(path: Path, side: int = 50_000) -> Path:
    """A one-pixel GIF whose screen and picture say side x side: a few dozen bytes."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", side, side)  # the logical screen
    palette = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0
    picture = data.index(b",", 13 + palette)  # the image descriptor: left, top, width, height
    data[picture + 5 : picture + 9] = struct.pack("<HH", side, side)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [_png_bomb, _gif_bomb])
def test_an_image_bomb_fails_media_too_large_before_it_is_decoded(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    bomb = make(tmp_path / "bomb")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(MediaTooLarge, match=r"50000x50000 \(2500000000 pixels\); the limit is 67108864 pixels "
                                            r"\(VIDEOQA_MAX_IMAGE_PIXELS\)"):  # fmt: skip
        decode_image(bomb, GEOMETRY, load_settings({}))
    # The limit is the setting's.
    with pytest.raises(MediaTooLarge, match="the limit is 1000 pixels"):
        small = _picture(tmp_path / "small.png", "RGB")
        decode_image(small, GEOMETRY, load_settings({"VIDEOQA_MAX_IMAGE_PIXELS": "1000"}))


def _picture(path: Path, mode: str) -> Path:
    rng = np.random.default_rng(len(mode))
    image = Image.fromarray(rng.integers(0, 256, (150, 200, 4), dtype=np.uint8), "RGBA").convert(mode)
    image.save(path)
    return path


@pytest.mark.parametrize(("name", "mode"), [("a.png", "RGBA"), ("b.jpg", "RGB"), ("c.gif", "P"), ("d.png", "L"),
                                            ("e.webp", "RGB"), ("f.bmp", "RGB")])  # fmt: skip
def test_images_decoded_in_the_sandbox_have_the_pixels_of_in_process_decoding(
    tmp_path: Path, name: str, mode: str
) -> None:
    path = _picture(tmp_path / name, mode)
    with Image.open(path) as image:
        expected = GEOMETRY.resize(image.convert("RGB"))
    got = decode_image(path, GEOMETRY, load_settings({}))
    assert got.mode == "RGB" and got.size == (96, 64)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_file_that_is_not_an_image_fails_invalid_media(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("not an image")
    with pytest.raises(InvalidMedia, match="not a readable image"):
        decode_image(path, GEOMETRY, load_settings({}))


# --- through the service --------------------------------------------------------------------------


def _submit(service: RunningService, video: Path, image: tuple[str, bytes]) -> str:
    with open(video, "rb") as handle:
        response = requests.post(
            service.url("/v1/jobs"),
            files=[
                ("videos", (video.name, handle, "video/mp4")),
                ("images", (image[0], io.BytesIO(image[1]), "image/png")),
            ],
            data={"question": "What is shown?", "num_frames": "2", "max_new_tokens": "3"},
            timeout=30,
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_an_image_bomb_fails_its_job_and_a_normal_image_is_stored_as_decoded(
    service: RunningService, s3: object, sample_videos: list[Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    bomb = _submit(service, sample_videos[0], ("bomb.png", _png_bomb(tmp_path / "bomb.png").read_bytes()))
    picture = _picture(tmp_path / "cat.png", "RGB").read_bytes()
    normal = _submit(service, sample_videos[0], ("cat.png", picture))
    failed = service.wait(bomb)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "media_too_large"
    assert "VIDEOQA_MAX_IMAGE_PIXELS" in failed["error"]["message"]
    assert service.wait(normal)["status"] == "succeeded"
    # The worker said at start what confines its decode children.
    assert "decode sandbox: seccomp filter on" in (service.logs / "cpu.log").read_text()
    geometry = load_geometry(str(tiny_model_dir))
    key = f"service/images/{hashlib.sha256(picture).hexdigest()}/{geometry.key()}.png"
    stored = Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))  # type: ignore[attr-defined]
    with Image.open(io.BytesIO(picture)) as image:
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(geometry.resize(image.convert("RGB"))))
