"""Prompt sources to files the core reads: texts, uploads, paths under the data root, hub datasets."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import redis

from eigenshift_core.errors import InputError
from eigenshift_core.prompts import SUFFIXES
from workers.jobs import TooLarge, now
from workers.owners import Caller
from workers.settings import Settings
from workers.specs import PromptSource, TextSource
from workers.store import ArtifactStore, check_key


def data_path(settings: Settings, relative: str, *, field: str, suffixes: tuple[str, ...] | None = SUFFIXES) -> Path:
    """A file under the data root; refuses `..`, escapes through links, missing files and (unless
    `suffixes` is None) other kinds than prompt files."""
    if settings.data_root is None:
        raise InputError("this service has no data root (set EIGENSHIFT_DATA_ROOT): send prompts as texts or "
                         "file_id", field=field)
    if ".." in Path(relative).parts or "\\" in relative or "\x00" in relative:
        raise InputError(f"path {relative!r} must not contain '..'", field=field)
    root = settings.data_root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"path {relative!r} is outside the data root", field=field)
    if not path.is_file():
        raise InputError(f"no file {relative!r} under the data root", field=field)
    if suffixes is not None and path.suffix not in suffixes:
        raise InputError(f"prompt files must be one of {', '.join(SUFFIXES)}", field=field)
    return path


def upload_key(file_id: str, *, field: str = "prompts.file_id") -> str:
    return f"uploads/{check_key(file_id, field=field)}"


class Uploads:
    """Files sent to POST /files: the bytes in the store under `uploads/<id>`, the owner (the sending key's
    name) in Redis. A job may name only its own key's uploads (admins: any)."""

    def __init__(self, client: redis.Redis, store: ArtifactStore, prefix: str = "eigenshift") -> None:
        self.redis = client
        self.store = store
        self._owners = f"{prefix}:uploads"

    def put(self, data: bytes, suffix: str, caller: Caller) -> str:
        """Keep `data` as a new upload owned by `caller`; its id."""
        file_id = f"{uuid.uuid4().hex}{suffix}"
        self.store.put_bytes(upload_key(file_id, field="file"), data)
        record = {"owner": caller.name, "created_at": now().timestamp()}
        self.redis.hset(self._owners, file_id, json.dumps(record))
        return file_id

    def reap(self, *, retention_s: float, at: datetime | None = None) -> list[str]:
        """Delete uploads older than `retention_s` (the file, then its record); their ids. Uploads recorded
        before their time was (no `created_at`) count as made now: they go one retention period later."""
        cutoff = ((at or now()) - timedelta(seconds=retention_s)).timestamp()
        expired = []
        for name, raw in self.redis.hgetall(self._owners).items():
            file_id, record = str(name), json.loads(raw)
            if "created_at" not in record:
                record["created_at"] = now().timestamp()
                self.redis.hset(self._owners, file_id, json.dumps(record))
            elif record["created_at"] < cutoff:
                self.store.delete(upload_key(file_id, field="file"))
                self.redis.hdel(self._owners, file_id)
                expired.append(file_id)
        return expired

    def check(self, file_id: str, caller: Caller, *, field: str) -> None:
        """The upload exists and `caller` may use it; another key's is refused as a missing one."""
        key = upload_key(file_id, field=field)
        raw = self.redis.hget(self._owners, file_id)
        owner = json.loads(raw).get("owner") if raw is not None else None
        if not caller.sees(owner) or not self.store.exists(key):
            raise InputError(f"no uploaded file {file_id!r}", field=field)


def check_source(source: PromptSource, settings: Settings, uploads: Uploads, caller: Caller) -> None:
    """Everything about a source that can be known without reading it through (API side, before queuing)."""
    if source.texts is not None:
        if len(source.texts) > settings.max_job_prompts:
            raise TooLarge(f"{len(source.texts)} prompts; max_job_prompts={settings.max_job_prompts}")
        if any(len(text) > settings.max_prompt_chars for text in source.texts):
            raise TooLarge(f"a prompt is longer than max_prompt_chars={settings.max_prompt_chars} characters")
    elif source.file_id is not None:
        uploads.check(source.file_id, caller, field="prompts.file_id")
    elif source.path is not None:
        data_path(settings, source.path, field="prompts.path")
    elif source.hub_dataset is not None:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise InputError("hub datasets need the `datasets` package, which this service lacks",
                             field="prompts.hub_dataset") from None


def materialize(source: PromptSource, settings: Settings, store: ArtifactStore, work: Path) -> Path:
    """A local CSV/JSONL/TXT file holding the source's prompts (worker side)."""
    work.mkdir(parents=True, exist_ok=True)
    if source.texts is not None:
        path = work / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in source.texts), encoding="utf-8")
        return path
    if source.file_id is not None:
        try:
            return store.get_file(upload_key(source.file_id), work / f"upload{Path(source.file_id).suffix}")
        except FileNotFoundError:
            raise InputError(f"no uploaded file {source.file_id!r}", field="prompts.file_id") from None
    if source.path is not None:
        return data_path(settings, source.path, field="prompts.path")
    return _hub_dataset(source, work)


def _hub_dataset(source: PromptSource, work: Path) -> Path:
    try:
        import datasets
    except ImportError:
        raise InputError("hub datasets need the `datasets` package", field="prompts.hub_dataset") from None
    try:
        rows = datasets.load_dataset(source.hub_dataset, split=source.split)
    except Exception as error:  # the hub, the cache or the name: all the caller's to fix
        raise InputError(f"cannot load {source.hub_dataset!r}: {str(error).splitlines()[0]}",
                         field="prompts.hub_dataset") from None
    if source.column not in rows.column_names:
        raise InputError(f"dataset has no column {source.column!r}", field="prompts.column")
    path = work / "prompts.jsonl"
    texts = [str(t) for t in rows[source.column]]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    return path



def text_path(source: TextSource, settings: Settings, store: ArtifactStore, work: Path, *, field: str) -> Path:
    """A local copy of a text file named by upload id or by path under the data root (worker side)."""
    if source.path is not None:
        return data_path(settings, source.path, field=f"{field}.path", suffixes=None)
    assert source.file_id is not None
    work.mkdir(parents=True, exist_ok=True)
    try:
        return store.get_file(upload_key(source.file_id, field=f"{field}.file_id"), work / f"{field}.txt")
    except FileNotFoundError:
        raise InputError(f"no uploaded file {source.file_id!r}", field=f"{field}.file_id") from None


def check_text(source: TextSource, settings: Settings, uploads: Uploads, caller: Caller, *, field: str) -> None:
    """API side: the text file exists (under the data root, or as an upload `caller` may use)."""
    if source.path is not None:
        data_path(settings, source.path, field=f"{field}.path", suffixes=None)
    elif source.file_id is not None:
        uploads.check(source.file_id, caller, field=f"{field}.file_id")
