"""Bounded input through the running API and a CPU worker (on the spare Redis database, so the
shared service's workers never see these jobs): an s3:// object over the byte cap fails without
being read whole, and a presigned URL's signature reaches neither an error message nor a log."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import BUCKET, REDIS_HOST, SPARE_REDIS_DB, RunningService, service_env
from worker.cli.stack import Stack, api_command, cpu_worker_command, free_port, wait_for_http

CAP_BYTES = 1_000_000
OBJECT_BYTES = 40_000_000


class CountingProxy:
    """A TCP relay that counts the bytes it hands from the server to the client: what a client
    that stops reading early was sent at most (the object, or the socket buffers' worth)."""

    def __init__(self, upstream_port: int, *, undeclared_length: bool = False) -> None:
        self.upstream_port = upstream_port
        self.undeclared_length = undeclared_length
        self.to_client = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        head: bytes | None = b"" if counted and self.undeclared_length else None
        body_left = None
        try:
            while data := source.recv(1 << 16):
                if head is not None:
                    head, data, body_left = self._without_length(head + data)
                    if head is not None:
                        continue
                target.sendall(data)
                if counted:
                    with self._lock:
                        self.to_client += len(data)
                if body_left is not None:
                    body_left -= len(data)
                    if body_left <= 0:
                        break  # the end of the body is now the end of the connection
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _without_length(received: bytes) -> tuple[bytes | None, bytes, int | None]:
        """The response with its Content-Length dropped, so only the connection's end delimits
        the body (as a server streaming an object of unknown size would send it)."""
        if b"\r\n\r\n" not in received:
            return received, b"", None
        header, _, body = received.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
        kept = [line for line in lines if not line.lower().startswith((b"content-length:", b"connection:"))]
        rewritten = b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"
        # Counted down by what is sent from here on, the rewritten head included.
        return None, rewritten + body, len(rewritten) + length

    def close(self) -> None:
        self._listener.close()


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """What an expired presigned URL answers."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def proxy(s3_endpoint: str) -> Iterator[CountingProxy]:
    relay = CountingProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def limited_service(
    aws_env: dict[str, str],
    s3: object,
    tiny_model_dir: Path,
    proxy: CountingProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    """The API and a CPU worker with a 1 MB download cap; the worker reaches S3 through ``proxy``."""
    url = f"redis://{REDIS_HOST}/{SPARE_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    logs = tmp_path_factory.mktemp("limited-service-logs")
    env = service_env(url, aws_env, tiny_model_dir, VIDEOQA_MAX_DOWNLOAD_BYTES=str(CAP_BYTES))
    stack = Stack(env=env, logs=logs)
    port = free_port()
    stack.start("api", api_command(port=port, workers=2))
    proxied = {"VIDEOQA_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    stack.start("cpu", cpu_worker_command(concurrency=1), extra_env=proxied)
    running = RunningService(f"http://127.0.0.1:{port}", env, stack, logs)
    try:
        wait_for_http(running.url("/healthz"), timeout_s=60)
        yield running
    finally:
        stack.stop()
        redis.Redis.from_url(url).flushdb()


def _submit(service: RunningService, url: str) -> str:
    response = requests.post(service.url("/v1/jobs"), json={"question": "q", "videos": [{"url": url}]}, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_an_s3_object_over_the_byte_cap_fails_without_being_read_whole(
    limited_service: RunningService, s3, proxy: CountingProxy
) -> None:
    s3.put_object(Bucket=BUCKET, Key="inputs/huge.mp4", Body=b"\0" * OBJECT_BYTES)
    before = proxy.to_client
    job = limited_service.wait(_submit(limited_service, f"s3://{BUCKET}/inputs/huge.mp4"), timeout_s=300)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "media_too_large"
    # The worker stopped reading at the headers; what reached its socket is the buffers' worth.
    assert proxy.to_client - before < OBJECT_BYTES // 4
    assert job["error"]["message"] == f"s3://{BUCKET}/inputs/huge.mp4 is {OBJECT_BYTES} bytes; the limit is {CAP_BYTES}"


def test_a_signed_url_query_reaches_no_error_message_and_no_log(limited_service: RunningService) -> None:
    secret = f"secret{uuid.uuid4().hex}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/v.mp4?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature={secret}"
        job = limited_service.wait(_submit(limited_service, url), timeout_s=300)
    finally:
        server.shutdown()
        server.server_close()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "fetch_failed", "message": f"http://127.0.0.1:{port}/v.mp4?*** answered HTTP 403"}
    logs = {path.name: path.read_text(errors="replace") for path in limited_service.logs.glob("*.log")}
    assert {"api.log", "cpu.log"} <= set(logs)
    assert f"http://127.0.0.1:{port}/v.mp4?*** answered HTTP 403" in logs["cpu.log"]
    for name, text in logs.items():
        assert secret not in text, name
        assert "AKIA" not in text, name


def test_an_s3_object_of_undeclared_length_is_cut_at_the_cap_while_it_streams(
    s3, s3_endpoint: str, tmp_path: Path
) -> None:
    """The same cap when the response does not say how long the object is: the read stops at the
    chunk that passes it."""
    from common.errors import MediaTooLarge
    from common.storage import S3Store

    s3.put_object(Bucket=BUCKET, Key="inputs/undeclared.mp4", Body=b"\0" * OBJECT_BYTES)
    relay = CountingProxy(int(s3_endpoint.rsplit(":", 1)[1]), undeclared_length=True)
    try:
        store = S3Store(BUCKET, endpoint_url=f"http://127.0.0.1:{relay.port}")
        with pytest.raises(MediaTooLarge) as refused:
            store.get_file("inputs/undeclared.mp4", tmp_path / "video", max_bytes=CAP_BYTES)
        assert (
            refused.value.message
            == f"s3://{BUCKET}/inputs/undeclared.mp4 is larger than the limit of {CAP_BYTES} bytes"
        )
        assert (tmp_path / "video").stat().st_size <= CAP_BYTES
        assert relay.to_client < OBJECT_BYTES // 4
        # Without a cap the same relay serves the whole object.
        store.get_file("inputs/undeclared.mp4", tmp_path / "whole")
        assert (tmp_path / "whole").stat().st_size == OBJECT_BYTES
    finally:
        relay.close()
