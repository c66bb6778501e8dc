"""Bringing a job's media to a local file: http(s) through the SSRF-safe downloader,
s3:// keys and uploads read from storage. The content hash is computed on the way.

For http(s) URLs that answer with a strong ETag, the URL, its ETag and the content hash are kept in
storage, so a later job on the same URL can ask ``If-None-Match`` and skip the download when the
server says the bytes did not change. Those records live under the job's scope (worker.cpu.frame_store)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import FetchFailed, InvalidMedia, NotFound
from common.redaction import public_url
from common.schemas import MediaSource
from common.settings import Settings
from common.storage import ObjectStore, S3Store, parse_s3_url
from common.url_policy import UrlPolicy
from worker.cpu import safe_http

_CHUNK = 1 << 20
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchedMedia:
    path: Path
    sha256: str
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class KnownVersion:
    """What a URL served last time: its ETag and the hash of those bytes."""

    etag: str
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


def _download_http(
    url: str, target: Path, settings: Settings, *, if_none_match: str | None = None
) -> dict[str, str] | None:
    return safe_http.download(
        url,
        target,
        policy=UrlPolicy.from_allowlist(settings.fetch_allowlist_entries),
        max_bytes=settings.max_download_bytes,
        connect_timeout_s=settings.download_connect_timeout_s,
        read_timeout_s=settings.download_read_timeout_s,
        deadline_s=settings.download_deadline_s,
        max_redirects=MAX_REDIRECTS,
        if_none_match=if_none_match,
    )


def fetch_media(source: MediaSource, target: Path, *, settings: Settings, store: ObjectStore) -> FetchedMedia:
    """Write the media named by ``source`` to ``target``."""
    fetched = _fetch(source, target, settings=settings, store=store, if_none_match=None)
    assert fetched is not None
    return fetched


def fetch_if_changed(
    source: MediaSource, target: Path, known: KnownVersion, *, settings: Settings, store: ObjectStore
) -> FetchedMedia | None:
    """Like ``fetch_media``, but None (and nothing downloaded) when the server answers that the URL
    still serves the bytes of ``known``."""
    return _fetch(source, target, settings=settings, store=store, if_none_match=known.etag)


def _version_key(url: str, scope: str) -> str:
    return f"{scope}sources/http/{hashlib.sha256(url.encode()).hexdigest()}.json"


def known_version(source: MediaSource, store: ObjectStore, *, scope: str = "") -> KnownVersion | None:
    """What ``source`` (an http(s) URL) served when it was last fetched with an ETag."""
    if source.kind != "http":
        return None
    try:
        record = json.loads(store.get_bytes(_version_key(source.location, scope)))
    except NotFound:
        return None
    if record.get("url") != source.location:
        return None
    return KnownVersion(etag=record["etag"], sha256=record["sha256"], size=record["size"])


def remember_version(source: MediaSource, fetched: FetchedMedia, store: ObjectStore, *, scope: str = "") -> None:
    # Strong ETags only: a weak one (W/"...") promises equivalent content, not the same bytes.
    if source.kind != "http" or not fetched.etag or fetched.etag.startswith("W/"):
        return
    record = {"url": source.location, "etag": fetched.etag, "sha256": fetched.sha256, "size": fetched.size}
    store.put_bytes(_version_key(source.location, scope), json.dumps(record).encode(), content_type="application/json")


def _shown(source: MediaSource) -> str:
    return public_url(source.location) if source.kind == "http" else source.location


def _fetch(
    source: MediaSource, target: Path, *, settings: Settings, store: ObjectStore, if_none_match: str | None
) -> FetchedMedia | None:
    etag = None
    try:
        if source.kind == "http":
            headers = _download_http(source.location, target, settings, if_none_match=if_none_match)
            if headers is None:
                return None
            etag = next((value for name, value in headers.items() if name.lower() == "etag"), None)
        elif source.kind == "s3":
            bucket, key = parse_s3_url(source.location)
            S3Store(bucket, endpoint_url=settings.s3_endpoint_url).get_file(
                key, target, max_bytes=settings.max_download_bytes
            )
        else:
            store.get_file(source.location, target)
    except NotFound as exc:
        raise FetchFailed(f"{_shown(source)}: {exc.message}") from None
    digest, size = _hash_file(target)
    if size == 0:
        raise InvalidMedia(f"{_shown(source)} is an empty file")
    return FetchedMedia(path=target, sha256=digest, size=size, etag=etag)
