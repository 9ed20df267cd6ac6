"""Job webhooks: when a job ends, its record is POSTed, signed, to the `callback_url` its spec names.

The API checks the URL when the job is submitted (`check_callback`). The `eigenshift.notify` task checks it
again after resolving the host, and connects to the very address it checked, so a name that resolves
elsewhere by then (DNS rebinding) cannot steer the request to an internal service. Redirects are never
followed. Every attempt is recorded in the job record; a 2xx ends the delivery, a 4xx other than 408/429
gives up, anything else (5xx, timeouts, connection or DNS trouble) is retried with exponential backoff.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from eigenshift.signing import sign
from eigenshift_core.errors import InputError
from workers.jobs import TERMINAL, JobStore, WebhookDelivery, now
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)
NOTIFY_TASK = "eigenshift.notify"
EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
RETRIED_4XX = (408, 429)
MAX_BACKOFF_S = 3600.0
MARKER_TTL_S = 30 * 86400  # a job is notified once; longer than any retention keeps it that way
SCHEMES = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class Refused(Exception):
    """The callback's host resolves to an address the allowlist does not permit."""


@dataclass(frozen=True)
class Allowlist:
    """`webhook_allowed_hosts`, parsed: exact names, `*.suffix` suffixes, networks (CIDRs or single IPs),
    and `*` for any name or public address."""

    names: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...]
    any_host: bool

    @classmethod
    def parse(cls, entries: Sequence[str]) -> Allowlist:
        names, suffixes, networks, any_host = set(), [], [], False
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry == "*":
                any_host = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    if not entry or "/" in entry or "*" in entry:
                        raise ValueError(f"webhook_allowed_hosts: {raw!r} is no host name, *.suffix or CIDR") from None
                    names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks), any_host)

    def listed(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network for network in self.networks)

    def allows_name(self, host: str) -> bool:
        return self.any_host or host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        """A global unicast address passes; any other (loopback, private, link-local, ...) only when listed."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return self.allows_address(address.ipv4_mapped)
        return (address.is_global and not address.is_multicast) or self.listed(address)


@dataclass(frozen=True)
class CallbackTarget:
    """Where a callback goes: scheme, host (lower case, no brackets), port, and the address when the host is one."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    address: IPAddress | None


def _refuse(message: str) -> InputError:
    return InputError(f"callback_url {message}", field="callback_url")


def check_callback_url(url: str, allowlist: Allowlist) -> CallbackTarget:
    """The target of `url` when its scheme, port and host are allowed (no DNS here: delivery resolves and
    checks again); an `InputError` naming `callback_url` otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise _refuse(f"is not a valid URL: {error}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in SCHEMES:
        raise _refuse(f"must be http or https, not {scheme or 'no scheme'!r}")
    if not host:
        raise _refuse("names no host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("must not carry credentials (the signature authenticates the service)")
    if not allowlist.names and not allowlist.suffixes and not allowlist.networks and not allowlist.any_host:
        raise _refuse("is refused: callbacks are off (webhook_allowed_hosts is empty)")
    try:
        address: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    # `localhost` always means loopback: judge it as the address it will be.
    judged = address or (ipaddress.ip_address("127.0.0.1") if host == "localhost" or host.endswith(".localhost")
                         else None)
    allowed = allowlist.allows_name(host) if address is None else allowlist.any_host or allowlist.listed(address)
    if not allowed or (judged is not None and not allowlist.allows_address(judged)):
        raise _refuse(f"host {host!r} is not an allowed callback host (webhook_allowed_hosts)")
    netloc = f"[{host}]" if address is not None and address.version == 6 else host
    default = SCHEMES[scheme]
    return CallbackTarget(scheme, host, port or default, urlunsplit(("", "", parts.path or "/", parts.query, "")),
                          netloc if port in (None, default) else f"{netloc}:{port}", address)


def check_callback(url: str | None, settings: Settings) -> None:
    """Refuse (422 naming `callback_url`) a callback URL the settings do not allow; nothing when none given."""
    if url is not None:
        check_callback_url(url, Allowlist.parse(settings.webhook_allowed_hosts))


def system_resolver(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_target(target: CallbackTarget, allowlist: Allowlist, resolve: Resolver = system_resolver) -> IPAddress:
    """The address to connect to. Every address the host resolves to must be allowed, not just the first:
    the one connected to is the one checked."""
    if target.address is not None:
        addresses: list[IPAddress] = [target.address]
    else:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(target.host, target.port)]
        except ValueError as error:
            raise Refused(f"{target.host!r} resolved to an unreadable address: {error}") from None
    refused = [str(a) for a in addresses if not allowlist.allows_address(a)]
    if not addresses or refused:
        raise Refused(f"{target.host!r} resolves to {', '.join(refused) or 'nothing'}, not an allowed address")
    return addresses[0]


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


def _send_notify(job_id: str, delivery_id: str) -> None:
    from workers.celery_app import app

    app.send_task(NOTIFY_TASK, args=(job_id, delivery_id), queue=get_settings().queue)


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
            (send or _send_notify)(job_id, delivery_id)
        except Exception:
            jobs.redis.delete(marker)  # let a later transition try again
            raise
        return delivery_id
    except Exception:
        log.warning("could not queue the webhook of job %s", job_id, exc_info=True)
        return None
