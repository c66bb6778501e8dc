"""Bringing a job's media to a local file: http(s) streamed with a byte cap and timeouts,
s3:// keys and uploads read from storage. The content hash is computed on the way."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import requests

from common.errors import FetchFailed, InvalidMedia, MediaTooLarge, NotFound, TransientError
from common.schemas import MediaSource
from common.settings import Settings
from common.storage import ObjectStore, S3Store, parse_s3_url

_CHUNK = 1 << 20
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchedMedia:
    path: Path
    sha256: str
    size: int


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _download_http(url: str, target: Path, settings: Settings) -> None:
    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    cap = settings.max_download_bytes
    try:
        with session.get(
            url,
            stream=True,
            timeout=(settings.download_connect_timeout_s, settings.download_read_timeout_s),
        ) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise TransientError(f"{url} answered HTTP {response.status_code}")
            if response.status_code >= 400:
                raise FetchFailed(f"{url} answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise MediaTooLarge(f"{url} is {declared} bytes; the limit is {cap}")
            written = 0
            with open(target, "wb") as out:
                for chunk in response.iter_content(_CHUNK):
                    written += len(chunk)
                    if written > cap:
                        raise MediaTooLarge(f"{url} is larger than the limit of {cap} bytes")
                    out.write(chunk)
    except requests.TooManyRedirects:
        raise FetchFailed(f"{url} redirects more than {MAX_REDIRECTS} times") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientError(f"could not download {url}: {exc.__class__.__name__}") from None
    except requests.RequestException as exc:
        raise FetchFailed(f"could not download {url}: {exc}") from None


def fetch_media(source: MediaSource, target: Path, *, settings: Settings, store: ObjectStore) -> FetchedMedia:
    """Write the media named by ``source`` to ``target``."""
    try:
        if source.kind == "http":
            _download_http(source.location, target, settings)
        elif source.kind == "s3":
            bucket, key = parse_s3_url(source.location)
            S3Store(bucket, endpoint_url=settings.s3_endpoint_url).get_file(key, target)
        else:
            store.get_file(source.location, target)
    except NotFound as exc:
        raise FetchFailed(f"{source.location}: {exc.message}") from None
    digest, size = _hash_file(target)
    if size == 0:
        raise InvalidMedia(f"{source.location} is an empty file")
    return FetchedMedia(path=target, sha256=digest, size=size)
