"""HTTP downloads (and webhook POSTs) that cannot be turned against the internal network.

Each hop's URL is checked by the ``UrlPolicy`` and the connection goes to the one address that
was checked (so a DNS answer that changes between check and connect is never used); redirects
are followed by hand, at most ``max_redirects`` times, each hop checked again. The body is cut at
a byte cap and at a total deadline. Messages name a URL without its query, which may hold a
signature.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from common.errors import FetchFailed, MediaTooLarge, TransientError
from common.redaction import public_url
from common.url_policy import Target, UrlPolicy

_CHUNK = 1 << 20
_REDIRECTS = {301, 302, 303, 307, 308}


def _open(
    target: Target,
    connect_s: float,
    read_s: float,
    extra_headers: dict[str, str],
    method: str = "GET",
    body: bytes | None = None,
) -> urllib3.BaseHTTPResponse:
    timeout = urllib3.Timeout(connect=connect_s, read=read_s)
    address = str(target.address)
    pool: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        # TLS still verifies the certificate against the name, not the pinned address.
        pool = urllib3.HTTPSConnectionPool(
            address, target.port, timeout=timeout, retries=False, maxsize=1,
            server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(),
        )  # fmt: skip
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1)
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    return pool.urlopen(
        method, path, body=body,
        headers={"Host": host_header, "User-Agent": "videoqa", "Accept-Encoding": "identity", **extra_headers},
        redirect=False, retries=False, preload_content=False,
    )  # fmt: skip


@contextmanager
def _final_response(
    url: str, policy: UrlPolicy, max_redirects: int, open_hop: Callable[[Target], urllib3.BaseHTTPResponse]
) -> Iterator[tuple[str, urllib3.BaseHTTPResponse]]:
    """The first answer that is not a redirect, and the URL that gave it. Every hop is checked by
    ``policy`` before ``open_hop`` connects to the address it checked."""
    for _hop in range(max_redirects + 1):
        target = policy.check(url)
        try:
            response = open_hop(target)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"could not connect to {target.host}: {exc.__class__.__name__}") from None
        try:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchFailed(f"{public_url(url)} redirects without a Location")
                url = urljoin(url, location)
                continue
            yield url, response
            return
        finally:
            response.release_conn()
            response.close()
    raise FetchFailed(f"{public_url(url)} redirects more than {max_redirects} times")


def download(
    url: str,
    target_path: Path,
    *,
    policy: UrlPolicy,
    max_bytes: int,
    connect_timeout_s: float,
    read_timeout_s: float,
    deadline_s: float,
    max_redirects: int = 3,
    if_none_match: str | None = None,
) -> dict[str, str] | None:
    """Stream ``url`` into ``target_path``; returns the final response's headers.

    With ``if_none_match`` (an ETag seen before), a ``304 Not Modified`` answer writes nothing and
    returns None: the caller still has what that ETag names.
    """
    deadline = time.monotonic() + deadline_s
    extra_headers = {"If-None-Match": if_none_match} if if_none_match else {}

    def open_hop(target: Target) -> urllib3.BaseHTTPResponse:
        return _open(target, connect_timeout_s, read_timeout_s, extra_headers)

    with _final_response(url, policy, max_redirects, open_hop) as (url, response):
        try:
            if response.status == 304 and if_none_match:
                return None
            if response.status >= 500 or response.status == 429:
                raise TransientError(f"{public_url(url)} answered HTTP {response.status}")
            if response.status >= 400:
                raise FetchFailed(f"{public_url(url)} answered HTTP {response.status}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise MediaTooLarge(f"{public_url(url)} is {declared} bytes; the limit is {max_bytes}")
            written = 0
            with open(target_path, "wb") as out:
                # read1 returns what has arrived, so a slow drip is still checked against the deadline.
                while chunk := response.read1(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise MediaTooLarge(f"{public_url(url)} is larger than the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise FetchFailed(f"{public_url(url)} took longer than {deadline_s:.0f} s to download")
                    out.write(chunk)
            return dict(response.headers)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"download of {public_url(url)} broke off: {exc.__class__.__name__}") from None


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    policy: UrlPolicy,
    timeout_s: float,
    max_redirects: int = 3,
) -> int:
    """POST ``body`` to ``url``; returns the final answer's HTTP status.

    Redirects are followed by hand with the same POST (a webhook has nothing to GET), each hop
    checked by ``policy`` (``BlockedUrl`` otherwise). The answer's body is not read: a receiver
    cannot make the caller hold a large or slow response.
    """

    def open_hop(target: Target) -> urllib3.BaseHTTPResponse:
        return _open(target, timeout_s, timeout_s, headers, method="POST", body=body)

    with _final_response(url, policy, max_redirects, open_hop) as (_url, response):
        return int(response.status)
