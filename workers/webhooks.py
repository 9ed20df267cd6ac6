"""Job webhooks, delivered: when a job ends, its record is POSTed, signed, to the `callback_url` its spec names.

Three modules, arrows pointing one way: the URL policy is `workers.callbacks` (the API checks the URL when
the job is submitted); delivery is here; queueing is `workers.celery_app.queue_notification`, which sends
the `eigenshift.notify` task that calls `deliver`. Delivery checks the URL again after resolving the host,
and connects to the very address it checked, so a name that resolves elsewhere by then (DNS rebinding)
cannot steer the request to an internal service. Redirects are never followed. Every attempt is recorded
in the job record; a 2xx ends the delivery, a 4xx other than 408/429 gives up, anything else (5xx,
timeouts, connection or DNS trouble) is retried with exponential backoff.

Nothing here imports Celery, and signing comes from `eigenshift.signing` (standard library only).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from eigenshift.signing import sign
from eigenshift_core.errors import InputError
from workers.callbacks import (  # noqa: F401 (re-exported: the policy's names, for existing importers)
    Allowlist,
    CallbackTarget,
    IPAddress,
    Refused,
    Resolver,
    check_callback,
    check_callback_url,
    resolve_target,
    system_resolver,
)
from workers.jobs import JobStore, WebhookDelivery, now
from workers.settings import Settings

if TYPE_CHECKING:
    from workers.celery_app import queue_notification as queue_notification

log = logging.getLogger(__name__)
EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
RETRIED_4XX = (408, 429)
MAX_BACKOFF_S = 3600.0


def webhook_secret(settings: Settings) -> str:
    """The signing key: `webhook_secret`, else the one kept in <data_dir>/webhook-secret (made at first use,
    mode 0600; made aside and linked into place, so concurrent processes agree on one)."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    path = settings.data_dir / "webhook-secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".webhook-secret.{uuid.uuid4().hex}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("whsec_" + secrets.token_urlsafe(32) + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        draft.unlink()
    return path.read_text().strip()


def backoff_s(settings: Settings, attempt: int) -> float:
    """Wait after failed attempt `attempt` (1-based): webhook_backoff_s, doubled each time, capped at an hour."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))


def retryable(status_code: int | None) -> bool:
    """Worth another attempt: no answer (timeout, connection, DNS), a 5xx, 408 or 429."""
    return status_code is None or status_code >= 500 or status_code in RETRIED_4XX


@dataclass(frozen=True)
class Attempt:
    delivery: WebhookDelivery
    retry: bool


def _post(target: CallbackTarget, address: IPAddress, body: str, headers: dict[str, str], timeout_s: float,
          transport: httpx.BaseTransport | None) -> int:
    """POST to `address` itself (never a fresh lookup), naming the host in Host and TLS SNI; the status."""
    literal = f"[{address}]" if address.version == 6 else str(address)
    url = f"{target.scheme}://{literal}:{target.port}{target.path}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.address is None else {}
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport) as client, \
            client.stream("POST", url, content=body.encode(), headers={**headers, "Host": target.host_header},
                          extensions=extensions) as response:
        return response.status_code


def deliver(settings: Settings, jobs: JobStore, job_id: str, delivery_id: str, attempt: int, *,
            resolve: Resolver = system_resolver, transport: httpx.BaseTransport | None = None) -> Attempt:
    """Attempt `attempt` of delivery `delivery_id`: POST the job's record, record the outcome in it."""
    record = jobs.get(job_id)
    body = record.model_dump_json(exclude={"deliveries"})
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json", "User-Agent": "eigenshift-webhook/1",
        "X-EigenShift-Event": EVENTS.get(record.state, f"job.{record.state}"), "X-EigenShift-Delivery": delivery_id,
        "X-EigenShift-Timestamp": timestamp, "X-EigenShift-Signature": sign(webhook_secret(settings), timestamp, body),
    }
    status: int | None = None
    error: str | None = None
    final = False
    try:
        allowlist = Allowlist.parse(settings.webhook_allowed_hosts)
        target = check_callback_url(str(record.params.get("callback_url") or ""), allowlist)
        status = _post(target, resolve_target(target, allowlist, resolve), body, headers,
                       settings.webhook_timeout_s, transport)
    except (InputError, Refused) as refusal:
        error, final = f"refused: {refusal}", True
    except (httpx.HTTPError, OSError) as trouble:  # timeouts, refused connections, DNS failures
        error = f"{type(trouble).__name__}: {trouble}"[:500]
    if status is not None and 300 <= status < 400:
        error = "redirects are not followed"
    delivery = WebhookDelivery(id=delivery_id, attempt=attempt, at=now(), status_code=status, error=error,
                               ok=status is not None and 200 <= status < 300)
    jobs.update(job_id, lambda r: r.deliveries.append(delivery))
    retry = not delivery.ok and not final and retryable(status) and attempt < settings.webhook_max_attempts
    return Attempt(delivery, retry)


def __getattr__(name: str) -> Any:
    """`queue_notification` lives with the queue (`workers.celery_app`); it is still found here, imported
    only when asked for, so importing delivery never imports Celery. New code imports it from there."""
    if name == "queue_notification":
        from workers.celery_app import queue_notification

        return queue_notification
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

