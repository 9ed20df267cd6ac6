"""What the API may do with jobs: check a spec, record it, queue its chain, cancel it, read its artifacts.

`check_spec` runs before anything is written, so a refused request leaves no record, key or file. Every call
names its `Caller`: a job is loaded only for its owner (or an admin), in `get`, and another key's job is
reported as missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from eigenshift_core.errors import InputError
from eigenshift_core.prompts import PromptSet, load_prompts, parse_rows, require_disjoint
from workers.celery_app import create_celery, enqueue_steps
from workers.interventions import InterventionNotFound, InterventionRegistry
from workers.jobs import (
    TERMINAL,
    JobError,
    JobNotFound,
    JobRecord,
    JobState,
    JobStore,
    Unavailable,
    connect,
    now,
)
from workers.models import grant_model
from workers.owners import SYSTEM, Caller
from workers.scorers import grant_scorer
from workers.settings import Settings
from workers.sources import Uploads, check_source, check_text, data_path
from workers.specs import (
    EvaluateSpec,
    ExtractSpec,
    JobSpec,
    PipelineSpec,
    PromptSource,
    ReconstructSpec,
    steps_for,
)
from workers.store import ArtifactStore, check_key, open_store
from workers.webhooks import check_callback


class JobEnded(Exception):
    """The job is over (succeeded, failed or cancelled): it cannot be cancelled."""


class JobService:
    """Jobs, interventions and artifacts, as the API sees them."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, store: ArtifactStore | None = None,
                 celery: Celery | None = None) -> None:
        self.settings = settings
        self.redis = client or connect(settings)
        self.store = store or open_store(settings)
        self.jobs = JobStore(self.redis, settings.key_prefix)
        self.interventions = InterventionRegistry(self.redis, self.store, settings.key_prefix)
        self.uploads = Uploads(self.redis, self.store, settings.key_prefix)
        self.celery = celery or create_celery(settings)

    # -- jobs ------------------------------------------------------------------------------------------

    def submit(self, kind: str, spec: JobSpec, idempotency_key: str | None = None, *,
               caller: Caller = SYSTEM) -> tuple[JobRecord, bool]:
        """Check, record (owned by `caller`) and queue a job; a replayed Idempotency-Key of the same caller
        returns the first job. (record, created)"""
        self.check_spec(spec, caller)
        if not self.jobs.live_workers():
            raise Unavailable("no worker is alive to run jobs")
        record, created = self.jobs.create(kind, spec.model_dump(mode="json"), list(steps_for(kind, spec)),
                                           idempotency_key, owner=caller.name)
        if created:
            self._enqueue(record, idempotency_key)
        return record, created

    def _enqueue(self, record: JobRecord, idempotency_key: str | None = None) -> None:
        try:
            enqueue_steps(self.celery, record, self.settings.queue)
        except OperationalError as error:
            message = f"the broker refused the job: {error}"
            if idempotency_key is not None:  # a retry with the same key must start afresh, not find this
                self.jobs.drop_idempotency_claim(idempotency_key, record.owner, record.id)

            def fail(r: JobRecord) -> None:
                r.state, r.finished_at = "failed", now()
                r.error = JobError(type="Unavailable", message=message)

            self.jobs.update(record.id, fail)
            raise Unavailable(message) from None

    def get(self, job_id: str, caller: Caller) -> JobRecord:
        """The job, when `caller` may see it; else JobNotFound, as for an unknown id."""
        check_key(job_id, field="job_id")
        record = self.jobs.get(job_id)
        if not caller.sees(record.owner):
            raise JobNotFound(job_id)
        return record

    def list_jobs(self, caller: Caller, *, kind: str | None = None, state: JobState | None = None, offset: int = 0,
             limit: int = 50) -> tuple[list[JobRecord], int]:
        """The jobs `caller` may see, newest first, filtered; (page, total matching)."""
        return self.jobs.list(kind=kind, state=state, offset=offset, limit=limit, caller=caller)

    def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        """Ask a job to stop: a queued one is cancelled now, a running one at its next batch boundary.
        A job that has already ended raises `JobEnded` (nothing to cancel)."""
        self.get(job_id, caller)

        def change(r: JobRecord) -> None:
            if r.state in TERMINAL:
                raise JobEnded(f"job {job_id} has already ended ({r.state}): nothing to cancel")
            r.cancel_requested = True
            if r.state == "queued":
                r.state = "cancelled"

        return self.jobs.update(job_id, change)

    def artifact(self, job_id: str, name: str, caller: Caller) -> Iterator[bytes]:
        record = self.get(job_id, caller)
        check_key(name, field="name")
        if name not in record.artifacts:
            raise FileNotFoundError(name)
        return self.store.iter_bytes(f"jobs/{job_id}/{name}")

    def queue_depth(self) -> int:
        return int(self.redis.llen(self.settings.queue))

    # -- checks ----------------------------------------------------------------------------------------

    def check_spec(self, spec: JobSpec, caller: Caller = SYSTEM) -> None:
        """What needs settings or state: allowed model and scorer, sources, rows, and referenced jobs, uploads
        and interventions that `caller` may use."""
        grant_model(self.settings, spec.model)
        scorer: str | None = getattr(spec, "scorer", None)
        if scorer is not None:
            grant_scorer(self.settings, scorer)
        check_callback(spec.callback_url, self.settings)
        if getattr(spec, "reference_csv", None):
            data_path(self.settings, spec.reference_csv, field="reference_csv")  # type: ignore[attr-defined]
        if isinstance(spec, EvaluateSpec | PipelineSpec) and spec.ppl_text is not None:
            check_text(spec.ppl_text, self.settings, self.uploads, caller, field="ppl_text")
        source: PromptSource | None = getattr(spec, "prompts", None)
        if source is not None:
            check_source(source, self.settings, self.uploads, caller)
            self._check_rows(source, spec)
        if isinstance(spec, ExtractSpec) and spec.generate_job_id:
            self._require_step(spec.generate_job_id, "generate", "generate_job_id", caller)
        if isinstance(spec, ReconstructSpec) and spec.extract_job_id:
            self._require_step(spec.extract_job_id, "extract", "extract_job_id", caller)
        if isinstance(spec, EvaluateSpec):
            field = "intervention_id" if spec.intervention_id is not None else "intervention_ids"
            for intervention_id in spec.evaluated_ids():
                try:
                    self.interventions.get(check_key(intervention_id, field=field), caller)
                except InterventionNotFound:
                    raise InputError(f"no intervention {intervention_id!r}", field=field) from None

    def _check_rows(self, source: PromptSource, spec: JobSpec) -> None:
        ranges = ({"train_rows": spec.train_rows, "eval_rows": spec.eval_rows} if isinstance(spec, PipelineSpec)
                  else {"rows": getattr(spec, "rows", None)})
        if source.texts is not None:
            for field, rows in ranges.items():
                parse_rows(rows, len(source.texts), field=field)
            if isinstance(spec, PipelineSpec):
                _disjoint(parse_rows(spec.train_rows, len(source.texts)), parse_rows(spec.eval_rows, len(source.texts)))
        elif source.path is not None:
            path = data_path(self.settings, source.path, field="prompts.path")
            sets = {field: _load_rows(path, rows, field) for field, rows in ranges.items()}
            if isinstance(spec, PipelineSpec):
                require_disjoint(sets["train_rows"], sets["eval_rows"])

    def _require_step(self, job_id: str, step: str, field: str, caller: Caller) -> None:
        try:
            record = self.get(job_id, caller)
        except (JobNotFound, InputError):
            raise InputError(f"no job {job_id!r}", field=field) from None
        if step not in record.steps_done:
            raise InputError(f"job {job_id!r} has no finished {step} step (state {record.state})", field=field)


def _load_rows(path: Path, rows: str | None, field: str) -> PromptSet:
    try:
        return load_prompts(path, rows)
    except InputError as error:
        raise InputError(str(error), field=field if "rows" in str(error) else error.field) from None


def _disjoint(train: tuple[int, int], held_out: tuple[int, int]) -> None:
    if train[0] < held_out[1] and held_out[0] < train[1]:
        raise InputError("train_rows and eval_rows overlap: evaluate on held-out prompts", field="eval_rows")

