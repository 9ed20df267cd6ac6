"""Job records behind index sets: listing reads only its page, the indexes follow every change, an
Idempotency-Key's claim and its job are written together, and uploads expire."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta

import pytest
from kombu.exceptions import OperationalError

from workers import job_service as job_service_module
from workers.jobs import STATES, JobRecord, JobStore, Unavailable, connect, now
from workers.owners import Caller
from workers.settings import Settings
from workers.sources import Uploads
from workers.specs import GenerateSpec
from workers.store import open_store

ALICE, BOB, ADMIN = Caller("alice"), Caller("bob"), Caller("root", admin=True)


@pytest.fixture
def jobs(worker_settings: Settings) -> JobStore:
    return JobStore(connect(worker_settings), worker_settings.key_prefix)


def _fill(jobs: JobStore) -> list[JobRecord]:
    made = []
    for i, (kind, owner) in enumerate(itertools.product(["generate", "pipeline"], ["alice", "bob", None])):
        for j in range(3):
            record, _ = jobs.create(kind, {"n": i * 10 + j}, [kind], owner=owner)
            state = STATES[(i + j) % len(STATES)]
            made.append(jobs.update(record.id, lambda r, s=state: setattr(r, "state", s)))
    return made


def test_listing_pages_through_the_indexes_and_matches_a_full_scan(jobs: JobStore) -> None:
    made = _fill(jobs)
    newest_first = sorted(made, key=lambda r: r.created_at, reverse=True)
    for kind, state, caller in itertools.product([None, "generate", "pipeline"], [None, *STATES],
                                                 [None, ALICE, BOB, ADMIN]):
        expected = [r.id for r in newest_first if (kind is None or r.kind == kind)
                    and (state is None or r.state == state) and (caller is None or caller.sees(r.owner))]
        page, total = jobs.list(kind=kind, state=state, caller=caller, offset=1, limit=2)
        assert total == len(expected) and [r.id for r in page] == expected[1:3], (kind, state, caller)
    assert jobs.count_by_state() == {s: sum(r.state == s for r in made) for s in STATES}
    assert not [key for key in jobs.redis.scan_iter(f"{jobs.prefix}:tmp:*")]  # intersections are dropped


def test_a_page_reads_only_its_own_records(jobs: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(jobs)
    read: list[int] = []
    mget = jobs.redis.mget
    monkeypatch.setattr(jobs.redis, "mget", lambda keys, *a: read.append(len(keys)) or mget(keys, *a))
    jobs.list(limit=3)
    jobs.count_by_state()
    assert read == [3]


def test_the_indexes_follow_updates_and_deletes_and_are_built_for_old_records(jobs: JobStore) -> None:
    record, _ = jobs.create("generate", {}, ["generate"], owner="alice")
    jobs.update(record.id, lambda r: setattr(r, "state", "running"))
    assert [r.id for r in jobs.list(state="running")[0]] == [record.id] and not jobs.list(state="queued")[1]
    jobs.delete(record.id)
    assert jobs.list(caller=ALICE)[1] == 0 and jobs.count_by_state()["running"] == 0

    # A record written by a version without the state/kind/owner indexes is found once they are built.
    old = JobRecord(id="old-job", kind="extract", params={}, steps=["extract"], created_at=now(), owner="bob")
    jobs.redis.set(jobs._job(old.id), old.model_dump_json())
    jobs.redis.zadd(jobs._index, {old.id: old.created_at.timestamp()})
    jobs.redis.delete(f"{jobs.prefix}:jobs:indexed")
    assert [r.id for r in jobs.list(kind="extract", caller=BOB)[0]] == ["old-job"]


def test_a_failed_enqueue_drops_the_idempotency_claim(worker_settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    service = job_service_module.JobService(worker_settings)
    monkeypatch.setattr(service.jobs, "live_workers", lambda: ["worker"])

    def refuse(*_: object) -> None:
        raise OperationalError("broker down")

    monkeypatch.setattr(job_service_module, "enqueue_steps", refuse)
    spec = GenerateSpec.model_validate({"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1})
    with pytest.raises(Unavailable):
        service.submit("generate", spec, "retry-me", caller=ALICE)
    failed = service.jobs.list(caller=ALICE)[0]
    assert len(failed) == 1 and failed[0].state == "failed"  # kept, with its reason

    monkeypatch.setattr(job_service_module, "enqueue_steps", lambda *_: None)
    record, created = service.submit("generate", spec, "retry-me", caller=ALICE)
    assert created and record.id != failed[0].id  # the retry starts afresh instead of finding the failed job
    assert service.submit("generate", spec, "retry-me", caller=ALICE) == (record, False)


def test_old_uploads_are_reaped(worker_settings: Settings) -> None:
    store = open_store(worker_settings)
    uploads = Uploads(connect(worker_settings), store, worker_settings.key_prefix)
    old, fresh = uploads.put(b"a\n", ".txt", ALICE), uploads.put(b"b\n", ".txt", ALICE)
    legacy = "legacy.txt"  # recorded before uploads had a time
    store.put_bytes(f"uploads/{legacy}", b"c\n")
    uploads.redis.hset(uploads._owners, legacy, json.dumps({"owner": "alice"}))
    stamp = json.loads(uploads.redis.hget(uploads._owners, old))
    stamp["created_at"] -= 8 * 86400
    uploads.redis.hset(uploads._owners, old, json.dumps(stamp))

    assert uploads.reap(retention_s=7 * 86400) == [old]
    assert not store.exists(f"uploads/{old}") and uploads.redis.hget(uploads._owners, old) is None
    for kept in (fresh, legacy):
        assert store.exists(f"uploads/{kept}")
        uploads.check(kept, ALICE, field="prompts.file_id")
    later = uploads.reap(retention_s=7 * 86400, at=now() + timedelta(days=8))  # the legacy one was stamped now
    assert sorted(later) == sorted([fresh, legacy]) and not uploads.redis.hgetall(uploads._owners)
