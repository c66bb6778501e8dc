"""Object storage: one interface, an S3 implementation (AWS, MinIO, R2) and a local directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from common.errors import MediaTooLarge, NotFound, StorageUnavailable
from common.settings import Settings


class ObjectStore(Protocol):
    """Keys are ``/``-separated paths relative to the store's root."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

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

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {key!r}") from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, target)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise NotFound(f"no object {key!r}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

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

    def _call(self, method: str, **kwargs: object) -> object:
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
                body.seek(0)  # type: ignore[union-attr]
            self._call("put_object", Bucket=self.bucket, **kwargs)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._put(Key=self._key(key), Body=data, ContentType=content_type)

    def get_bytes(self, key: str) -> bytes:
        response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()  # type: ignore[index]

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self._put(Key=self._key(key), Body=body)

    def get_file(self, key: str, path: Path, *, max_bytes: int | None = None) -> None:
        """With ``max_bytes``, an object larger than that is refused from its declared length, or
        at the chunk that passes it: never read whole."""
        response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        body = response["Body"]  # type: ignore[index]
        shown = f"s3://{self.bucket}/{self._key(key)}"
        try:
            declared = response.get("ContentLength")  # type: ignore[attr-defined]
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
        try:
            self._call("head_object", Bucket=self.bucket, Key=self._key(key))
        except NotFound:
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
