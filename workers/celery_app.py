"""The Celery app (`celery -A workers.celery_app worker -P solo`), configured lazily from `Settings`, and
what goes onto its queue: a job's next step (`enqueue_steps`) and its webhook (`queue_notification`).

Nothing reads the environment at import: `add_defaults` takes a callable that runs on first use.
A worker writes a heartbeat key while it lives, so readiness never depends on a busy solo pool
answering a broadcast ping; on each beat it also requeues the steps whose worker died (see `workers.reaper`,
which is handed these functions rather than importing them, so no import runs back here).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from workers.jobs import TERMINAL, JobRecord, JobStore, connect
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)
TASK_NAMES = {"generate": "eigenshift.generate", "extract": "eigenshift.extract",
              "reconstruct": "eigenshift.reconstruct", "evaluate": "eigenshift.evaluate"}
NOTIFY_TASK = "eigenshift.notify"
MARKER_TTL_S = 30 * 86400  # a job is notified once; longer than any retention keeps it that way


def enqueue_steps(celery: Celery, record: JobRecord, queue: str) -> None:
    """Queue the job's first step that is not done yet. Each step queues the next one itself, while it still
    holds the job's lease (see `workers.runner`): a worker lost between two steps leaves its lease to expire,
    and the job is requeued, never stranded `running` with no step queued."""
    remaining = [step for step in record.steps if step not in record.steps_done]
    if remaining:
        celery.send_task(TASK_NAMES[remaining[0]], args=(record.id,), queue=queue, retry=False)


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (default: the process's settings, read when first needed)."""
    app = Celery("eigenshift", include=["workers.tasks"])
    app.add_defaults(lambda: (settings or get_settings()).celery_config())
    return app


app = create_celery()
_stop = threading.Event()


def send_notification(job_id: str, delivery_id: str) -> None:
    """Queue the `eigenshift.notify` task of one delivery."""
    app.send_task(NOTIFY_TASK, args=(job_id, delivery_id), queue=get_settings().webhook_queue)


def queue_notification(jobs: JobStore, job_id: str, send: Callable[[str, str], None] | None = None) -> str | None:
    """Queue the webhook of job `job_id` once it has ended, if it names a callback_url; its delivery id.
    Called at every terminal transition (and harmless elsewhere): a Redis marker queues one delivery per job,
    however often a redelivered task gets here. Never raises: a webhook never fails its job."""
    marker = f"{jobs.prefix}:webhook:{job_id}"
    try:
        record = jobs.get(job_id)
        if record.state not in TERMINAL or not record.params.get("callback_url"):
            return None
        delivery_id = str(uuid.uuid4())
        if not jobs.redis.set(marker, delivery_id, nx=True, ex=MARKER_TTL_S):
            return None
        try:
            (send or send_notification)(job_id, delivery_id)
        except Exception:
            jobs.redis.delete(marker)  # let a later transition try again
            raise
        return delivery_id
    except Exception:
        log.warning("could not queue the webhook of job %s", job_id, exc_info=True)
        return None


def _worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@signals.worker_ready.connect
def start_heartbeat(**_: Any) -> None:
    """Beat every `heartbeat_s` from a daemon thread (the solo pool's thread is busy with tasks)."""
    from workers.reaper import reap_expired, requeue_lost
    from workers.sources import Uploads
    from workers.store import open_store

    settings = get_settings()
    jobs = JobStore(connect(settings), settings.key_prefix)
    store = open_store(settings)

    def beat() -> None:
        next_reap = time.monotonic()
        while not _stop.is_set():
            try:
                jobs.beat(_worker_name(), ttl_s=settings.heartbeat_s * 3)
                requeue_lost(jobs, lambda record: enqueue_steps(app, record, settings.queue),
                             lambda job_id: queue_notification(jobs, job_id), max_attempts=settings.max_attempts)
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + settings.reap_interval_s
                    reap_expired(jobs, store, retention_s=settings.job_retention_s)
                    Uploads(jobs.redis, store, settings.key_prefix).reap(retention_s=settings.upload_retention_s)
            except Exception:  # Redis away for a while: keep trying, the key expires meanwhile
                log.warning("heartbeat or reaping failed", exc_info=True)
            _stop.wait(settings.heartbeat_s)

    threading.Thread(target=beat, name="eigenshift-heartbeat", daemon=True).start()


@signals.worker_shutdown.connect
def stop_heartbeat(**_: Any) -> None:

    _stop.set()
    settings = get_settings()
    try:
        JobStore(connect(settings), settings.key_prefix).forget_worker(_worker_name())
    except Exception:
        log.warning("could not remove heartbeat", exc_info=True)

