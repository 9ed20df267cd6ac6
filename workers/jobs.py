"""Job records in Redis: one JSON document per job, an index by creation time, idempotency keys, heartbeats.

Every read-modify-write goes through `JobStore.update`, an optimistic WATCH/MULTI transaction, so the
worker's progress and the API's cancel never overwrite each other.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import redis
from pydantic import BaseModel, Field

from workers.owners import Caller
from workers.settings import Settings

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
IDEMPOTENCY_TTL_S = 24 * 3600
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
# The claim of an Idempotency-Key and the new record in one step: either both are written, or (key taken)
# neither is and the claim is returned. KEYS: idem (when ARGV[6] == "1"), the record, then the index sets.
CREATE_JOB = """
local first = 2
if ARGV[6] == "1" then
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return redis.call('GET', KEYS[1]) end
else
  first = 1
end
redis.call('SET', KEYS[first], ARGV[3])
for i = first + 1, #KEYS do redis.call('ZADD', KEYS[i], ARGV[4], ARGV[5]) end
return false
"""
DROP_CLAIM = """
local claim = redis.call('GET', KEYS[1])
if claim and cjson.decode(claim)['job'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the lease; ARGV holder, ttl ms. Only the holder extends or drops its lease.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] the lease, KEYS[2] the in-flight set; ARGV holder, job id. One step, so no reader ever sees the job in
# flight without a lease (what the reaper takes for a dead worker); a lease another task took keeps its mark.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[2]) end
return 0
"""
# KEYS[1] the lease, KEYS[2] the in-flight set; ARGV job id. Only a job nobody holds leaves the set.
FORGET_UNLEASED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


class JobNotFound(LookupError):
    """No job has this id."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another body."""


class TooLarge(Exception):
    """A body, a batch or one prompt is over a configured limit (HTTP 413)."""


class Unavailable(Exception):
    """Redis or every worker is unreachable: try again later."""


class Progress(BaseModel):
    """Where a running job is: `done` of `total` `unit`s (prompts, samples, texts, windows) of `stage`."""

    stage: str | None = None
    done: int = 0
    total: int = 0
    unit: str | None = None


class JobError(BaseModel):
    type: str
    message: str


class WebhookDelivery(BaseModel):
    """One attempt to POST a finished job's record to its callback_url; attempts of one delivery share `id`."""

    id: str
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    ok: bool = False


class JobRecord(BaseModel):
    """What Redis holds about one job."""

    id: str
    kind: str
    state: JobState = "queued"
    params: dict[str, object] = Field(default_factory=dict)
    steps: list[str] = Field(default_factory=list)
    steps_done: list[str] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    intervention_id: str | None = None
    artifacts: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    worker_losses: int = Field(0, description="times a worker died mid-step; each loss requeues the step once")
    deliveries: list[WebhookDelivery] = Field(default_factory=list)
    owner: str | None = Field(None, description="the name of the API key that made the job (None: the service)")


def now() -> datetime:
    return datetime.now(UTC)


def connect(settings: Settings) -> redis.Redis:
    """A client that gives up after `redis_timeout_s` instead of hanging."""
    return redis.Redis.from_url(
        settings.redis_address, socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s, decode_responses=True, health_check_interval=30,
    )


def body_digest(kind: str, params: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode()).hexdigest()


class JobStore:
    """Job records, their index and idempotency keys under `key_prefix`."""

    def __init__(self, client: redis.Redis, prefix: str = "eigenshift") -> None:
        self.redis = client
        self.prefix = prefix

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    def _by(self, facet: str, value: str | None) -> str:
        """The index of the jobs with this state, kind or owner ("-": none), scored by created_at."""
        return f"{self.prefix}:jobs:{facet}:{value if value is not None else '-'}"

    def _indexes(self, record: JobRecord) -> builtins.list[str]:
        return [self._index, self._by("state", record.state), self._by("kind", record.kind),
                self._by("owner", record.owner)]

    def _idempotency(self, idempotency_key: str, owner: str | None) -> str:
        scoped = json.dumps([owner, idempotency_key])
        return f"{self.prefix}:idem:{hashlib.sha256(scoped.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def create(self, kind: str, params: dict[str, object], steps: list[str],
               idempotency_key: str | None = None, owner: str | None = None) -> tuple[JobRecord, bool]:
        """A new queued record, or the existing one for a replayed Idempotency-Key; (record, created).

        Idempotency-Keys are namespaced by `owner`: two keys may use the same one without meeting. The claim
        and the record are written in one step, so a claim never points at no job."""
        self.ensure_indexes()
        record = JobRecord(id=uuid.uuid4().hex, kind=kind, params=params, steps=steps, created_at=now(), owner=owner)
        claimed = idempotency_key is not None
        keys = ([self._idempotency(idempotency_key, owner)] if idempotency_key is not None else []) + \
            [self._job(record.id), *self._indexes(record)]
        claim = json.dumps({"job": record.id, "digest": body_digest(kind, params)})
        previous = self.redis.eval(CREATE_JOB, len(keys), *keys, claim, IDEMPOTENCY_TTL_S, record.model_dump_json(),
                                   record.created_at.timestamp(), record.id, "1" if claimed else "0")
        if previous is None:
            return record, True
        first = json.loads(previous)  # type: ignore[arg-type]
        if first.get("digest") != body_digest(kind, params):
            raise IdempotencyConflict("this Idempotency-Key was used with another request body")
        return self.get(first["job"]), False

    def drop_idempotency_claim(self, idempotency_key: str, owner: str | None, job_id: str) -> None:
        """Forget the key's claim if it is `job_id`'s (its enqueue failed: a retry with the key starts afresh)."""
        self.redis.eval(DROP_CLAIM, 1, self._idempotency(idempotency_key, owner), job_id)

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.get(self._job(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(raw)

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        """Apply `change` to the stored record atomically (retried when another writer got in first)."""
        key = self._job(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    record = JobRecord.model_validate_json(raw)
                    before = record.state
                    change(record)
                    pipe.multi()
                    pipe.set(key, record.model_dump_json())
                    if record.state != before:  # the state index follows, in the same transaction
                        pipe.zrem(self._by("state", before), job_id)
                        pipe.zadd(self._by("state", record.state), {job_id: record.created_at.timestamp()})
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def delete(self, job_id: str) -> None:
        """Forget a job: its record and its place in every index (artifacts are the store's business)."""
        raw = self.redis.get(self._job(job_id))
        pipe = self.redis.pipeline()
        pipe.delete(self._job(job_id))
        pipe.zrem(self._index, job_id)
        if raw is not None:
            for index in self._indexes(JobRecord.model_validate_json(raw)):
                pipe.zrem(index, job_id)
        pipe.execute()

    def list(self, *, kind: str | None = None, state: str | None = None, offset: int = 0,
             limit: int = 50, caller: Caller | None = None) -> tuple[builtins.list[JobRecord], int]:
        """Newest first, filtered (to what `caller` sees, when given); (page, total matching). Pages through
        the index sets, so only the page's records are read."""
        self.ensure_indexes()
        sources = ([self._by("state", state)] if state else []) + ([self._by("kind", kind)] if kind else [])
        if caller is not None and not caller.admin:
            sources.append(self._by("owner", caller.name) if caller.name is not None else self._by("owner", "\0"))
        if not sources:
            index, temporary = self._index, False
        elif len(sources) == 1:
            index, temporary = sources[0], False
        else:  # the intersection, kept only for this call
            index, temporary = f"{self.prefix}:tmp:{uuid.uuid4().hex}", True
            pipe = self.redis.pipeline()
            pipe.zinterstore(index, sources, aggregate="MAX")
            pipe.expire(index, 60)
            pipe.execute()
        try:
            total = int(self.redis.zcard(index))
            ids: builtins.list[str] = self.redis.zrevrange(index, offset, offset + limit - 1)  # type: ignore[assignment]
        finally:
            if temporary:
                self.redis.delete(index)
        raws = self.redis.mget([self._job(i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r is not None], total

    def finished_before(self, cutoff: datetime) -> builtins.list[JobRecord]:
        """Ended jobs created before `cutoff` (a superset of those that ended before it), oldest first."""
        self.ensure_indexes()
        ids = [str(i) for state in TERMINAL
               for i in self.redis.zrangebyscore(self._by("state", state), "-inf", cutoff.timestamp())]
        raws = self.redis.mget([self._job(i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r is not None]

    def ensure_indexes(self) -> None:
        """Build the state, kind and owner indexes from the records once (records of a version without them)."""
        marker = f"{self.prefix}:jobs:indexed"
        if self.redis.exists(marker):
            return
        ids: builtins.list[str] = self.redis.zrange(self._index, 0, -1)  # type: ignore[assignment]
        for start in range(0, len(ids), 500):
            raws = self.redis.mget([self._job(i) for i in ids[start:start + 500]])
            pipe = self.redis.pipeline()
            for raw in raws:
                if raw is not None:
                    record = JobRecord.model_validate_json(raw)
                    for index in self._indexes(record):
                        pipe.zadd(index, {record.id: record.created_at.timestamp()})
            pipe.execute()
        self.redis.set(marker, "1")

    def count_by_state(self) -> dict[str, int]:
        """Jobs in each state, from the index sizes (no record is read: /metrics scrapes this)."""
        self.ensure_indexes()
        pipe = self.redis.pipeline()
        for state in STATES:
            pipe.zcard(self._by("state", state))
        return dict(zip(STATES, (int(n) for n in pipe.execute()), strict=True))

    # -- step leases: who runs a step now ---------------------------------------------------------------
    # A task holds `lease:<job>` (PX, renewed while it runs) for the step in flight, and the job sits in the
    # `running` set meanwhile. A job in that set whose lease has expired lost its worker.

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def _running(self) -> str:
        return f"{self.prefix}:running"

    def claim(self, job_id: str, holder: str, ttl_s: float) -> bool:
        """Take the job's lease unless another task holds it; on success the job counts as in flight."""
        if not self.redis.set(self._lease(job_id), holder, nx=True, px=int(ttl_s * 1000)):
            return False
        self.redis.sadd(self._running, job_id)
        return True

    def renew(self, job_id: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease if `holder` still holds it."""
        return bool(self.redis.eval(RENEW_LEASE, 1, self._lease(job_id), holder, int(ttl_s * 1000)))

    def release(self, job_id: str, holder: str) -> None:
        """The step is over (whatever its outcome): drop the lease if still ours, and the in-flight mark unless
        another task holds the lease now (it is in flight again, as that task's)."""
        self.redis.eval(RELEASE_LEASE, 2, self._lease(job_id), self._running, holder, job_id)

    def in_flight_without_lease(self) -> builtins.list[str]:
        """Jobs marked in flight whose lease expired: their worker died or hung past the lease."""
        ids: builtins.list[str] = sorted(self.redis.smembers(self._running))  # type: ignore[arg-type]
        if not ids:
            return []
        held = self.redis.mget([self._lease(i) for i in ids])
        return [job_id for job_id, holder in zip(ids, held, strict=True) if holder is None]

    def forget_in_flight(self, job_id: str) -> None:
        """Drop the in-flight mark of a job whose lease is gone (kept if a new task claimed it meanwhile)."""
        self.redis.eval(FORGET_UNLEASED, 2, self._lease(job_id), self._running, job_id)

    # -- worker liveness -------------------------------------------------------------------------------

    def beat(self, worker: str, ttl_s: float) -> None:
        self.redis.set(f"{self.prefix}:worker:{worker}", json.dumps({"at": time.time()}), px=int(ttl_s * 1000))

    def forget_worker(self, worker: str) -> None:
        self.redis.delete(f"{self.prefix}:worker:{worker}")

    def live_workers(self) -> builtins.list[str]:
        marker = f"{self.prefix}:worker:"
        return sorted(key[len(marker):] for key in self.redis.scan_iter(f"{marker}*", count=100))
