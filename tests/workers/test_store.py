"""Both artifact stores behave alike; S3 runs against moto's standalone server over real HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from eigenshift_core.errors import InputError
from workers.settings import Settings
from workers.store import ArtifactStore, LocalStore, S3Store, check_key, get_dir, put_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, until the block ends; its URL."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    settings = Settings(store="s3", s3_endpoint_url=request.getfixturevalue("s3_endpoint"), s3_bucket="eigenshift-test",
                        s3_access_key_id="test", s3_secret_access_key="test", s3_prefix="svc")
    s3 = S3Store(settings)
    s3.client.create_bucket(Bucket=settings.s3_bucket)
    s3.delete_prefix("jobs")
    return s3


def test_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.json").write_text("{}")
    (source / "sub" / "b.bin").write_bytes(bytes(range(256)) * 5000)
    (source / ".hidden.tmp").write_text("never uploaded")
    assert put_dir(store, "jobs/1/extract", source) == ["a.json", "sub/b.bin"]
    assert store.list("jobs/1/extract") == ["a.json", "sub/b.bin"] and store.list("jobs/2") == []
    assert store.exists("jobs/1/extract/a.json") and not store.exists("jobs/1/extract/c.json")
    assert store.read_bytes("jobs/1/extract/sub/b.bin") == bytes(range(256)) * 5000
    copied = get_dir(store, "jobs/1/extract", tmp_path / "copy")
    assert (copied / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    with pytest.raises(FileNotFoundError):
        store.read_bytes("jobs/1/extract/missing")
    store.delete_prefix("jobs/1")
    assert store.list("jobs/1/extract") == []


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a//b", "a/.hidden", "a\\b", "", "a/..b"])
def test_keys_cannot_climb_out(key: str, store: ArtifactStore) -> None:
    with pytest.raises(InputError):
        check_key(key)
    with pytest.raises(InputError):
        store.put_bytes(key, b"x")


def test_concurrent_writes_of_one_key_leave_one_whole_file(tmp_path: Path) -> None:
    """A task delivered twice writes the same artifact twice at once: one complete version wins."""
    from concurrent.futures import ThreadPoolExecutor

    store = LocalStore(tmp_path)
    versions = [bytes([i]) * 1_000_000 for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda data: store.put_bytes("jobs/j/generate/out.bin", data), versions))
    assert store.read_bytes("jobs/j/generate/out.bin") in versions
    assert [p.name for p in (tmp_path / "jobs/j/generate").iterdir()] == ["out.bin"]  # no temp files left


def test_delete_removes_one_object_and_nothing_beside_it(store: ArtifactStore) -> None:
    store.put_bytes("uploads/a.txt", b"a")
    store.put_bytes("uploads/a.txt.keep", b"b")
    store.delete("uploads/a.txt")
    assert not store.exists("uploads/a.txt") and store.exists("uploads/a.txt.keep")
    store.delete("uploads/a.txt")  # gone already: nothing happens
