"""The downloader against real HTTP servers on loopback addresses: redirects into the internal
network, DNS rebinding, slow and endless bodies."""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import FetchFailed, MediaTooLarge
from common.url_policy import BlockedUrl, IPAddress, UrlPolicy
from worker.cpu.safe_http import download

BODY = b"video bytes " * 1000


class _Server(http.server.ThreadingHTTPServer):
    """Answers each path as ``routes`` says; ``hits`` lists the paths asked for."""

    hits: list[str]
    routes: dict[str, tuple[str, Any]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        routes = self.server.routes
        action = routes.get(self.path, ("body", BODY))
        kind, value = action
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", value)
            self.end_headers()
        elif kind == "drip":
            self.send_response(200)
            self.end_headers()
            for _ in range(value):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif kind == "endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"y" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(value)))
            self.end_headers()
            self.wfile.write(value)


def _serve(address: str) -> Iterator[_Server]:
    server = _Server((address, 0), _Handler)
    server.hits = []
    server.routes = {}
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture()
def public() -> Iterator[_Server]:
    """Plays a public host: 127.0.0.2 is allowlisted below."""
    yield from _serve("127.0.0.2")


@pytest.fixture()
def internal() -> Iterator[_Server]:
    """Plays an internal service nobody may reach: 127.0.0.3, not allowlisted."""
    yield from _serve("127.0.0.3")


def _url(server: _Server, path: str) -> str:
    host, port = server.socket.getsockname()[:2]
    return f"http://{host}:{port}{path}"


def _get(url: str, target: Path, policy: UrlPolicy | None = None, **limits: float) -> dict[str, str]:
    options = {"max_bytes": 1_000_000, "connect_timeout_s": 2.0, "read_timeout_s": 2.0, "deadline_s": 10.0, **limits}
    return download(url, target, policy=policy or UrlPolicy.from_allowlist(["127.0.0.2"]), **options)


def test_plain_download(public: _Server, tmp_path: Path) -> None:
    _get(_url(public, "/v.mp4"), tmp_path / "v")
    assert (tmp_path / "v").read_bytes() == BODY


def test_redirect_to_an_internal_address_is_blocked_at_that_hop(
    public: _Server, internal: _Server, tmp_path: Path
) -> None:
    public.routes["/go"] = ("redirect", _url(internal, "/secret"))
    with pytest.raises(BlockedUrl, match=r"127\.0\.0\.3"):
        _get(_url(public, "/go"), tmp_path / "v")
    assert public.hits == ["/go"]
    assert internal.hits == []


def test_at_most_three_redirects(public: _Server, tmp_path: Path) -> None:
    for hop in range(5):
        public.routes[f"/r{hop}"] = ("redirect", f"/r{hop + 1}")
    public.routes["/r3"] = ("body", b"three")
    _get(_url(public, "/r0"), tmp_path / "ok")
    assert (tmp_path / "ok").read_bytes() == b"three"
    public.routes["/r3"] = ("redirect", "/r4")
    with pytest.raises(FetchFailed, match="more than 3"):
        _get(_url(public, "/r0"), tmp_path / "v")


def test_dns_rebinding_cannot_move_the_connection(public: _Server, internal: _Server, tmp_path: Path) -> None:
    """The name answers the allowed address first and the internal one after: the connection goes
    to the address that was checked. (No DNS server of ours is reachable here, so a resolver
    function plays the rebinding DNS.)"""
    answers = iter(["127.0.0.2"] + ["127.0.0.3"] * 10)

    def rebinding(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(next(answers))]

    policy = UrlPolicy.from_allowlist(["127.0.0.2/32"], resolver=rebinding)
    port = public.server_address[1]
    internal_port_free = internal.server_address[1]
    assert internal_port_free  # both servers listen
    _get(f"http://media.example:{port}/v.mp4", tmp_path / "v", policy)
    assert public.hits == ["/v.mp4"]
    assert internal.hits == []


def test_slow_drip_is_cut_at_the_deadline(public: _Server, tmp_path: Path) -> None:
    public.routes["/slow"] = ("drip", 50)
    with pytest.raises(FetchFailed, match="longer than"):
        _get(_url(public, "/slow"), tmp_path / "v", deadline_s=1.0)
    assert (tmp_path / "v").stat().st_size < 50  # cut before the server finished dripping


def test_endless_body_is_cut_at_the_byte_cap(public: _Server, tmp_path: Path) -> None:
    public.routes["/endless"] = ("endless", None)
    with pytest.raises(MediaTooLarge, match="limit of 200000 bytes"):
        _get(_url(public, "/endless"), tmp_path / "v", max_bytes=200_000)
    assert (tmp_path / "v").stat().st_size <= 200_000


def test_declared_length_over_the_cap_is_refused_before_reading(public: _Server, tmp_path: Path) -> None:
    with pytest.raises(MediaTooLarge, match=f"is {len(BODY)} bytes"):
        _get(_url(public, "/v.mp4"), tmp_path / "v", max_bytes=100)


def test_loopback_without_allowlist_is_refused_before_connecting(public: _Server, tmp_path: Path) -> None:
    with pytest.raises(BlockedUrl):
        _get(_url(public, "/v.mp4"), tmp_path / "v", UrlPolicy())
    assert public.hits == []
