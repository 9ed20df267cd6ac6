"""Blobs (states, generations, interventions, reports, plots) by key, on local disk or in S3.

Keys are `/`-separated relative names (`jobs/<id>/extract/states.safetensors`); `check_key` refuses
anything that could climb out of the store (`..`, absolute paths, backslashes).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from eigenshift_core.errors import InputError
from workers.settings import Settings

KEY_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
CHUNK = 1 << 20


def check_key(key: str, *, field: str = "name") -> str:
    """Refuse keys with empty, `.`/`..`, hidden or odd-character parts."""
    parts = key.split("/")
    if not key or any(not KEY_PART.match(part) or part in (".", "..") or ".." in part for part in parts):
        raise InputError(f"invalid name {key!r}: letters, digits, '.', '_', '-' and '/' only, no '..'", field=field)
    return key


class ArtifactStore(Protocol):
    """Where blobs live; every backend behaves the same for these calls."""

    def put_file(self, key: str, path: Path) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix/`, relative to it, sorted."""
        ...

    def read_bytes(self, key: str) -> bytes: ...

    def iter_bytes(self, key: str) -> Iterator[bytes]: ...

    def get_file(self, key: str, path: Path) -> Path: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def delete(self, key: str) -> None:
        """Remove one object (nothing when it is gone already)."""
        ...


def put_dir(store: ArtifactStore, prefix: str, directory: Path) -> list[str]:
    """Upload every file under `directory` to `prefix/<relative path>`; returns the relative names."""
    names = []
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            name = path.relative_to(directory).as_posix()
            store.put_file(f"{prefix}/{name}", path)
            names.append(name)
    return names


def get_dir(store: ArtifactStore, prefix: str, directory: Path) -> Path:
    """Download every key under `prefix/` into `directory` (kept relative layout)."""
    for name in store.list(prefix):
        store.get_file(f"{prefix}/{name}", Path(directory) / name)
    return Path(directory)


class LocalStore:
    """A directory; writes go through a temp file and a rename, so readers never see half a blob."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(target)  # one per writer: a task delivered twice never mixes two files
        try:
            shutil.copyfile(path, tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(target)
        try:
            tmp.write_bytes(data)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self._existing(key).open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk

    def get_file(self, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._existing(key), path)
        return path

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path


class S3Store:
    """An S3 bucket (AWS, MinIO, moto): endpoint, bucket and credentials from settings."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=secret,
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
        )
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix) + "/"
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            names.extend(item["Key"][len(base):] for item in page.get("Contents", []))
        return sorted(names)

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_bytes(key))

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(key) from None
            raise
        yield from body.iter_chunks(CHUNK)

    def get_file(self, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as file:
            for chunk in self.iter_bytes(key):
                file.write(chunk)
        tmp.replace(path)
        return path

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [f"{prefix}/{name}" for name in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            objects = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})


def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


def open_store(settings: Settings) -> ArtifactStore:
    """The configured backend."""
    if settings.store == "s3":
        return S3Store(settings)
    return LocalStore(settings.artifacts_dir)
