"""Object storage: one interface, an S3 implementation (AWS, MinIO, R2) and a local directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from common.errors import MediaTooLarge, NotFound, StorageUnavailable
from common.settings import Settings

# Where the API keeps uploaded files: uploads/<job id>/<kind>-<position>-<name>.
UPLOADS_PREFIX = "uploads/"


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified: float  # when it was last written, seconds since the epoch


class ObjectStore(Protocol):
    """Keys are ``/``-separated paths relative to the store's root."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written; None when there is no such object."""
        ...

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]: ...

    def delete(self, keys: Iterable[str]) -> None:
        """Remove ``keys``; one that is already gone is no error."""
        ...

    def set_expiration(self, days: int) -> bool:
        """Have the store itself delete objects older than ``days``; False where it cannot."""
        ...

    def ping(self) -> None: ...


class LocalStore:
    """A directory on this machine: the single-machine default."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound(f"key {key!r} is outside the store")
        return path

    @staticmethod
    def _temporary(directory: Path) -> IO[bytes]:
        # Write then rename, so a reader never sees half a file. The sweeper removes directories
        # it emptied, possibly this one between our mkdir and the open: make it again then.
        for _ in range(3):
            directory.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.NamedTemporaryFile(dir=directory, delete=False)
            except FileNotFoundError:
                continue
        raise StorageUnavailable(f"storage directory {directory} keeps disappearing")

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        with self._temporary(path.parent) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {key!r}") from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with self._temporary(target.parent) as tmp, open(path, "rb") as source:
            shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, target)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise NotFound(f"no object {key!r}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = Path(directory, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    yield StoredObject(key, path.stat().st_mtime)
                except FileNotFoundError:
                    continue

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Empty directories would pile up with the content hashes that named them.
            for parent in path.parents:
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def set_expiration(self, days: int) -> bool:
        return False

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"storage directory {self.root} is not writable")


class S3Store:
    """A bucket (and key prefix) on any S3-compatible service, reached with boto3."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # endpoint_url=None lets boto3 honour AWS_ENDPOINT_URL itself.
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, **kwargs: object) -> Any:  # boto3 is untyped: its replies are plain dicts
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}:
                raise NotFound(f"no object {kwargs.get('Key')!r} in bucket {self.bucket!r}") from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or code in {"SlowDown", "RequestTimeout"}:
                raise StorageUnavailable(f"storage error {code}: {exc}") from exc
            raise
        except BotoCoreError as exc:
            raise StorageUnavailable(f"storage unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from botocore.exceptions import ClientError

        try:
            self._call("head_bucket", Bucket=self.bucket)
        except (NotFound, ClientError):
            try:
                self._call("create_bucket", Bucket=self.bucket)
            except ClientError as exc:
                # Another process may have created it between our two calls.
                if exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
        self._bucket_checked = True

    def _put(self, **kwargs: object) -> None:
        self.ensure_bucket()
        try:
            self._call("put_object", Bucket=self.bucket, **kwargs)
        except NotFound:
            # The bucket went away under us (a wiped MinIO, a test server restarted): make it again.
            self._bucket_checked = False
            self.ensure_bucket()
            body = kwargs.get("Body")
            if hasattr(body, "seek"):
                body.seek(0)
            self._call("put_object", Bucket=self.bucket, **kwargs)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._put(Key=self._key(key), Body=data, ContentType=content_type)

    def get_bytes(self, key: str) -> bytes:
        response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self._put(Key=self._key(key), Body=body)

    def get_file(self, key: str, path: Path, *, max_bytes: int | None = None) -> None:
        """With ``max_bytes``, an object larger than that is refused from its declared length, or
        at the chunk that passes it: never read whole."""
        response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        body = response["Body"]
        shown = f"s3://{self.bucket}/{self._key(key)}"
        try:
            declared = response.get("ContentLength")
            if max_bytes is not None and isinstance(declared, int) and declared > max_bytes:
                raise MediaTooLarge(f"{shown} is {declared} bytes; the limit is {max_bytes}")
            written = 0
            with open(path, "wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    written += len(chunk)
                    if max_bytes is not None and written > max_bytes:
                        raise MediaTooLarge(f"{shown} is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
        finally:
            # Closing an unread body drops its connection rather than draining the rest.
            body.close()

    def exists(self, key: str) -> bool:
        return self.modified(key) is not None

    def modified(self, key: str) -> float | None:
        try:
            response = self._call("head_object", Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return None
        return float(response["LastModified"].timestamp())

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][strip:], item["LastModified"].timestamp())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return
            raise StorageUnavailable(f"storage error while listing: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"storage unreachable: {exc}") from exc

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in [*keys, None]:
            if key is not None:
                batch.append(self._key(key))
            # DeleteObjects takes at most 1000 keys.
            if batch and (key is None or len(batch) == 1000):
                response = self._call(
                    "delete_objects", Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = response.get("Errors") or []
                if errors:
                    raise StorageUnavailable(f"{len(errors)} objects not deleted: {errors[0].get('Message')}")
                batch = []

    def set_expiration(self, days: int) -> bool:
        """One lifecycle rule of our own on the bucket, for our prefix; other rules stay."""
        from botocore.exceptions import ClientError

        rule_id = f"videoqa-expiration:{self.prefix}"[:255]
        rule = {
            "ID": rule_id,
            "Filter": {"Prefix": f"{self.prefix}/" if self.prefix else ""},
            "Status": "Enabled",
            "Expiration": {"Days": max(1, days)},
        }
        self.ensure_bucket()
        try:
            current = self._call("get_bucket_lifecycle_configuration", Bucket=self.bucket)
            rules = [r for r in current.get("Rules", []) if r.get("ID") != rule_id]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                return False
            rules = []
        try:
            self._call(
                "put_bucket_lifecycle_configuration",
                Bucket=self.bucket,
                LifecycleConfiguration={"Rules": [*rules, rule]},
            )
        except ClientError:
            # Not every S3-compatible service has lifecycle rules; the sweeper still deletes.
            return False
        return True

    def ping(self) -> None:
        self.ensure_bucket()


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def open_store(settings: Settings) -> ObjectStore:
    if settings.is_s3:
        bucket, prefix = parse_s3_url(settings.storage_url)
        return S3Store(bucket, prefix, endpoint_url=settings.s3_endpoint_url)
    location = settings.storage_url.removeprefix("file://")
    return LocalStore(Path(location))
