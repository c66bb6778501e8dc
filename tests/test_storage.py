"""Both storage implementations, the S3 one against moto's server over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from common.errors import NotFound, StorageUnavailable
from common.settings import load_settings
from common.storage import LocalStore, ObjectStore, S3Store, open_store
from worker.cli.stack import free_port


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.service)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3")  # the server, and this process's AWS variables
    # A bucket that does not exist yet: the store creates it.
    return S3Store(f"fresh-{uuid.uuid4().hex[:12]}", "some/prefix")


def test_round_trip_of_bytes_and_files(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("a/b.bin", b"payload")
    assert store.get_bytes("a/b.bin") == b"payload"
    assert store.exists("a/b.bin")
    assert not store.exists("a/c.bin")
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 3_000_000)
    store.put_file("big/file.bin", source)
    target = tmp_path / "copy.bin"
    store.get_file("big/file.bin", target)
    assert target.read_bytes() == source.read_bytes()
    store.put_bytes("a/b.bin", b"overwritten")
    assert store.get_bytes("a/b.bin") == b"overwritten"
    with pytest.raises(NotFound):
        store.get_bytes("missing")
    store.ping()


def test_s3_prefix_is_applied(s3) -> None:
    bucket = f"prefixed-{uuid.uuid4().hex[:8]}"
    S3Store(bucket, "jobs").put_bytes("k", b"v")
    assert s3.get_object(Bucket=bucket, Key="jobs/k")["Body"].read() == b"v"


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(NotFound):
        store.put_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def test_unreachable_s3_is_a_transient_error() -> None:
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable):
        store.get_bytes("anything")


def test_storage_url_picks_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_store(load_settings({"VIDEOQA_STORAGE_URL": str(tmp_path)})), LocalStore)
    assert isinstance(open_store(load_settings({"VIDEOQA_STORAGE_URL": "s3://bucket/p"})), S3Store)
