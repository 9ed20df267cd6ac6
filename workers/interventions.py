"""The intervention registry: artifacts in the store under `interventions/<id>/`, summaries in Redis,
and which one is active (the default) for each model."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field

from eigenshift_core.errors import InputError
from eigenshift_core.intervention import ARTIFACT_JSON, ARTIFACT_TENSORS
from workers.jobs import now
from workers.owners import Caller
from workers.store import ArtifactStore, check_key, get_dir

log = logging.getLogger(__name__)
ARTIFACT_FILES = (ARTIFACT_TENSORS, ARTIFACT_JSON)
BUILTIN_ID = "embedded-default"
CORE_DEFAULT = Path(__file__).resolve().parents[1] / "eigenshift_core" / "defaults" / "embedded"


class InterventionNotFound(LookupError):
    """No intervention has this id."""


class InterventionRecord(BaseModel):
    """What the registry knows about one intervention (its tensors stay in the store)."""

    id: str
    model: str
    k: int
    alpha: list[float]
    criterion: str | None = None
    metrics: dict[str, Any] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    created_at: datetime
    owner: str | None = Field(None, description="the API key that built it (None: the service's own)")
    sha256: dict[str, str] = Field(default_factory=dict, description="digest of each artifact file, "
                                   "recorded at registration and checked whenever the files are read")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


SUMMARY_KEYS = ("baseline", "intervention", "toxicity_reduction", "tph", "fluency_source")


def report_summary(report: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """The headline figures of an evaluation report, kept with its intervention: the report's own numbers,
    never recomputed; `evaluated_by` names the job that measured them (None: the committed default's)."""
    return {**{key: report.get(key) for key in SUMMARY_KEYS}, "evaluated_by": job_id}


class InterventionRegistry:
    def __init__(self, client: redis.Redis, store: ArtifactStore, prefix: str = "eigenshift") -> None:
        self.redis = client
        self.store = store
        self._hash = f"{prefix}:interventions"
        self._active = f"{prefix}:active"

    def register(self, intervention_id: str, directory: Path, *, model: str, job_id: str | None = None,
                 owner: str | None = None) -> InterventionRecord:
        """Upload an intervention directory and record its summary, owner and file digests (same id twice:
        the same result)."""
        check_key(intervention_id, field="intervention")
        info = json.loads((Path(directory) / ARTIFACT_JSON).read_text())
        record = InterventionRecord(
            id=intervention_id, model=model, k=int(info["k"]), alpha=[float(a) for a in info["alpha"]],
            criterion=info.get("criterion"), provenance=info, job_id=job_id, created_at=now(), owner=owner,
            sha256={name: file_sha256(Path(directory) / name) for name in ARTIFACT_FILES},
        )
        for name in ARTIFACT_FILES:
            self.store.put_file(f"interventions/{intervention_id}/{name}", Path(directory) / name)
        self.redis.hset(self._hash, intervention_id, record.model_dump_json())
        return record

    def set_metrics(self, intervention_id: str, metrics: dict[str, Any]) -> None:
        record = self._load(intervention_id)
        record.metrics = metrics
        self.redis.hset(self._hash, intervention_id, record.model_dump_json())

    def _load(self, intervention_id: str) -> InterventionRecord:
        raw = self.redis.hget(self._hash, intervention_id)
        if raw is None:
            raise InterventionNotFound(intervention_id)
        return InterventionRecord.model_validate_json(raw)

    def _visible(self, record: InterventionRecord, caller: Caller, active: set[str] | None = None) -> bool:
        """Its owner's and admins'; the built-in and each model's active one (an admin published it): everyone's."""
        if caller.sees(record.owner) or record.id == BUILTIN_ID:
            return True
        return record.id in active if active is not None else self.active_id(record.model) == record.id

    def get(self, intervention_id: str, caller: Caller) -> InterventionRecord:
        """The record, when `caller` may see it; else InterventionNotFound, as for an unknown id."""
        record = self._load(intervention_id)
        if not self._visible(record, caller):
            raise InterventionNotFound(intervention_id)
        return record

    def list(self, caller: Caller, model: str | None = None) -> list[InterventionRecord]:
        """What `caller` may see, oldest first, optionally of one model."""
        records = [InterventionRecord.model_validate_json(raw) for raw in self.redis.hvals(self._hash)]
        active = {str(value) for value in self.redis.hvals(self._active)}
        return sorted((r for r in records if (model is None or r.model == model) and self._visible(r, caller, active)),
                      key=lambda r: r.created_at)

    def activate(self, intervention_id: str, caller: Caller) -> InterventionRecord:
        record = self.get(intervention_id, caller)
        self.redis.hset(self._active, record.model, record.id)
        return record

    def active_id(self, model: str) -> str | None:
        value = self.redis.hget(self._active, model)
        return str(value) if value is not None else None

    def fetch(self, intervention_id: str, cache_dir: Path) -> Path:
        """The intervention's directory on local disk (downloaded once per id), its files matching the digests
        recorded at registration: a cached copy that differs is dropped and downloaded again, and a stored one
        that differs is refused (InputError naming `intervention`). Callers check visibility first (`get`)."""
        record = self._load(intervention_id)
        directory = Path(cache_dir) / check_key(intervention_id, field="intervention")
        if (directory / ARTIFACT_TENSORS).is_file() and self._mismatch(record, directory) is not None:
            log.warning("cached intervention %s differs from its recorded digest: downloading it again", intervention_id)
            shutil.rmtree(directory, ignore_errors=True)
        if not (directory / ARTIFACT_TENSORS).is_file():
            tmp = Path(cache_dir) / f".{intervention_id}.{uuid.uuid4().hex}.partial"
            get_dir(self.store, f"interventions/{intervention_id}", tmp)
            bad = self._mismatch(record, tmp)
            if bad is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                log.error("stored intervention %s: %s", intervention_id, bad)
                raise InputError(f"intervention {intervention_id!r} is corrupt: {bad}", field="intervention")
            try:
                tmp.replace(directory)  # atomic: a reader sees all of it or nothing
            except OSError:  # another thread got there first
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @staticmethod
    def _mismatch(record: InterventionRecord, directory: Path) -> str | None:
        """Why the files in `directory` are not the ones registered, or None when they are."""
        if ARTIFACT_TENSORS not in record.sha256:
            return "no digest was recorded when it was registered"
        for name, expected in record.sha256.items():
            path = Path(directory) / name
            if not path.is_file():
                return f"{name} is missing"
            if file_sha256(path) != expected:
                return f"{name} does not match the sha256 recorded when it was registered"
        return None

    def register_builtin(self, directory: Path | None, model: str = "embedded") -> InterventionRecord | None:
        """Register the committed default (or `directory`) once, and make it active when none is."""
        candidates = [directory] if directory else [CORE_DEFAULT, CORE_DEFAULT / "intervention"]
        found = next((c for c in candidates if c and (Path(c) / ARTIFACT_TENSORS).is_file()), None)
        if found is None:
            return None
        try:
            record = self._load(BUILTIN_ID)
        except InterventionNotFound:
            record = self.register(BUILTIN_ID, found, model=model)
        if ARTIFACT_TENSORS not in record.sha256:  # registered before digests were kept: record them now
            metrics = record.metrics
            record = self.register(BUILTIN_ID, found, model=model)
            if metrics is not None:
                self.set_metrics(BUILTIN_ID, metrics)
                record = self._load(BUILTIN_ID)
        report = Path(found) / "report.json"  # the committed default's evaluation (README's figures)
        if record.metrics is None and report.is_file():
            self.set_metrics(BUILTIN_ID, report_summary(json.loads(report.read_text())))
            record = self._load(BUILTIN_ID)
        self.redis.hsetnx(self._active, model, BUILTIN_ID)
        return record

