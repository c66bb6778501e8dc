"""Bringing a job's media to a local file: http(s) through the SSRF-safe downloader,
s3:// keys and uploads read from storage. The content hash is computed on the way."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from common.errors import FetchFailed, InvalidMedia, NotFound
from common.schemas import MediaSource
from common.settings import Settings
from common.storage import ObjectStore, S3Store, parse_s3_url
from common.url_policy import UrlPolicy
from worker import safe_http

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
    safe_http.download(
        url,
        target,
        policy=UrlPolicy.from_allowlist(settings.fetch_allowlist_entries),
        max_bytes=settings.max_download_bytes,
        connect_timeout_s=settings.download_connect_timeout_s,
        read_timeout_s=settings.download_read_timeout_s,
        deadline_s=settings.download_deadline_s,
        max_redirects=MAX_REDIRECTS,
    )


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
