"""Webhooks: which callback URLs pass (at submit and after resolution), signatures, and one delivery attempt
at a time against a real receiver on 127.0.0.1 (the Celery task around it is tested end to end in tests/api)."""

from __future__ import annotations

import json
import socket
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

import eigenshift
import eigenshift.client
from eigenshift.signing import sign, verify_signature
from eigenshift_core.errors import InputError
from workers import celery_app, webhooks
from workers.callbacks import Allowlist, Refused, check_callback_url, resolve_target
from workers.jobs import JobRecord, JobStore, connect
from workers.runner import StepContext, StepResult, run_step
from workers.settings import Settings
from workers.webhooks import deliver

PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:4700::1111"


class Receiver:
    """A webhook receiver on 127.0.0.1: answers the scripted statuses in turn (then 200); keeps every request
    as (headers with lower-case names, body)."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's spelling)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/eigenshift?src=test"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def refused_field(url: str, allowed: list[str]) -> str | None:
    try:
        check_callback_url(url, Allowlist.parse(allowed))
    except InputError as error:
        return error.field
    return None


# -- the host check --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.example.com/eigenshift", ["hooks.example.com"]),
    ("https://HOOKS.example.com./x", ["hooks.example.com"]),
    ("https://a.b.example.com/x", ["*.example.com"]),
    (f"https://{PUBLIC_V4}/x", ["*"]),
    (f"https://{PUBLIC_V4}/x", [f"{PUBLIC_V4}/32"]),
    (f"https://[{PUBLIC_V6}]:8443/x", ["2606:4700::/32"]),
    ("https://anything.example.org/", ["*"]),
])
def test_allowlisted_public_hosts_pass(url: str, allowed: list[str]) -> None:
    assert refused_field(url, allowed) is None


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://evil.example.net/", ["hooks.example.com"]),
    ("https://example.com/", ["*.example.com"]),
    ("https://badexample.com/", ["*.example.com"]),
    ("https://example.com.evil.net/", ["*.example.com"]),
    (f"https://{PUBLIC_V4}/", ["hooks.example.com"]),
    ("https://hooks.example.com/", []),  # empty allowlist: callbacks are off
])
def test_hosts_off_the_list_are_refused(url: str, allowed: list[str]) -> None:
    assert refused_field(url, allowed) == "callback_url"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "[::1]", "[fe80::1]", "[fc00::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[2001:db8::1]", "224.0.0.1",
    "localhost", "api.localhost",
])
def test_non_global_addresses_are_refused_unless_listed(host: str) -> None:
    assert refused_field(f"http://{host}:8080/hook", ["*"]) == "callback_url"
    assert refused_field(f"http://{host}:8080/hook", ["*", "0.0.0.0/0", "::/0"]) is None


@pytest.mark.parametrize(("host", "address"), [
    ("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("0", "0.0.0.0"), ("0x7f.1", "127.0.0.1"), ("10.0x1.0377", "10.1.0.255"), ("012.0.0.1", "10.0.0.1"),
    ("0xA9.254.169.254", "169.254.169.254"), ("3232235777", "192.168.1.1"),
    ("[64:ff9b::7f00:1]", "127.0.0.1"), ("[64:ff9b::a9fe:a9fe]", "169.254.169.254"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"), ("[::ffff:7f00:1]", "127.0.0.1"), ("[::127.0.0.1]", "127.0.0.1"),
    ("[::10.0.0.1]", "10.0.0.1"),
])
def test_numeric_and_embedded_ipv4_hosts_are_judged_as_their_address(host: str, address: str) -> None:
    """Every spelling a resolver reads as an internal IPv4 address is refused at submit, even under `*`, and
    passes exactly where that address is listed."""
    assert refused_field(f"http://{host}:8080/hook", ["*"]) == "callback_url"
    assert refused_field(f"http://{host}:8080/hook", ["*", "::/0"]) == "callback_url"  # judged as IPv4
    assert refused_field(f"http://{host}:8080/hook", [address]) is None
    target = check_callback_url(f"http://{host}:8080/hook", Allowlist.parse([address]))
    assert target.host == str(target.address) == address  # the host as checked: the IPv4 address itself
    assert str(resolve_target(target, Allowlist.parse([address]), lambda host, port: pytest.fail("no lookup"))) == address


@pytest.mark.parametrize("host", ["1.2.3.4.5", "08", "0x", "127.0.0.256", "0x1ffffffff", "1e3", "127.0.0.1a"])
def test_names_that_are_no_address_stay_names(host: str) -> None:
    from workers.callbacks import inet_aton, parse_address

    assert (host == "0x") == (inet_aton(host) is not None)  # glibc reads a bare `0x` as 0
    assert parse_address(host) is None or host == "0x"


def test_public_addresses_in_any_spelling_pass() -> None:
    assert refused_field("http://0x5db8d822/hook", ["*"]) is None  # 93.184.216.34
    assert refused_field("http://[::ffff:93.184.216.34]/hook", ["*"]) is None
    assert refused_field("http://[::1]/hook", ["::1"]) is None  # IPv6 loopback is no IPv4-compatible address


def test_listed_networks_allow_exactly_their_addresses() -> None:
    assert refused_field("http://127.0.0.1:8123/hook", ["127.0.0.1"]) is None
    assert refused_field("http://127.0.0.2:8123/hook", ["127.0.0.1"]) == "callback_url"
    assert refused_field("http://10.9.8.7/hook", ["10.0.0.0/8"]) is None
    assert refused_field("http://[::1]:9000/hook", ["::1"]) is None
    assert refused_field("http://[::1]:9000/hook", ["127.0.0.1"]) == "callback_url"
    assert refused_field("http://localhost:9000/hook", ["localhost"]) == "callback_url"  # the name alone is not enough
    assert refused_field("http://localhost:9000/hook", ["localhost", "127.0.0.0/8"]) is None


def test_ports_paths_and_the_host_header() -> None:
    allowed = Allowlist.parse(["127.0.0.1", "2606:4700::/32", "hooks.example.com"])
    target = check_callback_url("http://127.0.0.1:8123/hook?x=1#frag", allowed)
    assert (target.scheme, target.host, target.port, target.path) == ("http", "127.0.0.1", 8123, "/hook?x=1")
    assert target.host_header == "127.0.0.1:8123"
    v6 = check_callback_url(f"https://[{PUBLIC_V6}]:8443", allowed)
    assert (v6.port, v6.path, v6.host_header, str(v6.address)) == (8443, "/", f"[{PUBLIC_V6}]:8443", PUBLIC_V6)
    named = check_callback_url("https://hooks.example.com:443/x", allowed)
    assert (named.port, named.host_header, named.address) == (443, "hooks.example.com", None)
    assert check_callback_url("http://hooks.example.com/x", allowed).port == 80
    for bad_port in ("http://127.0.0.1:99999/", "http://127.0.0.1:-1/", "http://127.0.0.1:http/"):
        assert refused_field(bad_port, ["127.0.0.1"]) == "callback_url"


@pytest.mark.parametrize("url", [
    "ftp://hooks.example.com/x", "file:///etc/passwd", "javascript:alert(1)", "gopher://hooks.example.com/",
    "hooks.example.com/x", "//hooks.example.com/x", "http:///x", "https://user:secret@hooks.example.com/x",
    "http://[::1/x", "",
])
def test_bad_schemes_and_urls_are_refused(url: str) -> None:
    assert refused_field(url, ["*", "hooks.example.com"]) == "callback_url"


def test_a_bad_allowlist_entry_is_a_configuration_error() -> None:
    for entry in ("a/b", "foo*bar", ""):
        with pytest.raises(ValueError, match="webhook_allowed_hosts"):
            Allowlist.parse([entry])


def test_the_resolved_addresses_are_checked_again() -> None:
    """A name allowed at submit may resolve to an internal address later (rebinding): every address counts."""
    allowed = Allowlist.parse(["hooks.example.com"])
    target = check_callback_url("https://hooks.example.com/x", allowed)
    assert str(resolve_target(target, allowed, lambda host, port: [PUBLIC_V4])) == PUBLIC_V4
    for answer in (["10.0.0.5"], [PUBLIC_V4, "127.0.0.1"], ["fe80::1%eth0"], ["::ffff:169.254.169.254"], []):
        with pytest.raises(Refused):
            resolve_target(target, allowed, lambda host, port, answer=answer: answer)
    internal = Allowlist.parse(["hooks.example.com", "10.0.0.0/8"])
    assert str(resolve_target(target, internal, lambda host, port: ["10.0.0.5"])) == "10.0.0.5"
    for embedded in ("64:ff9b::7f00:1", "::127.0.0.1", "::ffff:10.0.0.5"):  # IPv4 inside IPv6, from DNS
        with pytest.raises(Refused):
            resolve_target(target, Allowlist.parse(["*"]), lambda host, port, answer=embedded: [answer])
    listed = Allowlist.parse(["hooks.example.com", "10.0.0.0/8"])  # allowed as 10.0.0.5, so connected as 10.0.0.5
    assert str(resolve_target(target, listed, lambda host, port: ["64:ff9b::a00:5"])) == "10.0.0.5"


# -- signatures and the secret ---------------------------------------------------------------------------


def test_signature_round_trip() -> None:
    body = json.dumps({"id": "j1", "state": "succeeded", "text": "naïve"}, ensure_ascii=False)
    signature = sign("s3cret", 1_700_000_000, body)
    assert signature.startswith("sha256=") and len(signature) == len("sha256=") + 64
    assert verify_signature("s3cret", "1700000000", body.encode(), signature, now=1_700_000_100)
    assert verify_signature("s3cret", 1_700_000_000, body, signature.upper().replace("SHA256=", "sha256="),
                            now=1_700_000_000)
    assert not verify_signature("s3cret", 1_700_000_000, body.replace("succeeded", "failed"), signature,
                                now=1_700_000_000)  # tampered body
    assert not verify_signature("other", 1_700_000_000, body, signature, now=1_700_000_000)  # wrong secret
    assert not verify_signature("s3cret", 1_700_000_001, body, signature, now=1_700_000_001)  # other timestamp
    assert not verify_signature("s3cret", 1_700_000_000, body, signature, now=1_700_000_301)  # stale
    assert not verify_signature("s3cret", 1_700_000_000, body, signature, now=1_699_999_000)  # from the future
    assert verify_signature("s3cret", 1_700_000_000, body, signature, tolerance_s=2e9, now=0)
    assert not verify_signature("s3cret", "soon", body, signature, now=1_700_000_000)
    assert not verify_signature("s3cret", 1_700_000_000, body, signature.removeprefix("sha256="), now=1_700_000_000)
    assert not verify_signature("s3cret", 1_700_000_000, body, "sha256=é", now=1_700_000_000)


def test_one_signing_implementation_serves_client_and_worker() -> None:
    assert eigenshift.verify_signature is eigenshift.client.verify_signature is verify_signature
    assert webhooks.sign is sign


def test_the_secret_is_made_once_mode_0600_unless_configured(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = webhooks.webhook_secret(settings)
    path = tmp_path / "data" / "webhook-secret"
    assert first.startswith("whsec_") and len(first) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert webhooks.webhook_secret(settings) == first == path.read_text().strip()
    assert sorted(p.name for p in path.parent.iterdir()) == ["webhook-secret"]
    assert webhooks.webhook_secret(settings.model_copy(update={"webhook_secret": SecretStr("configured")})) == "configured"


def test_retry_rules_and_backoff() -> None:
    assert all(webhooks.retryable(s) for s in (None, 500, 502, 503, 504, 408, 429))
    assert not any(webhooks.retryable(s) for s in (200, 204, 301, 302, 400, 401, 403, 404, 410, 422))
    settings = Settings(webhook_backoff_s=2.0)
    assert [webhooks.backoff_s(settings, a) for a in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert webhooks.backoff_s(settings, 40) == webhooks.MAX_BACKOFF_S


# -- delivery attempts against a real receiver -----------------------------------------------------------


@pytest.fixture
def hook_settings(worker_settings: Settings) -> Settings:
    return worker_settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"], "webhook_max_attempts": 3,
                                              "webhook_timeout_s": 5.0})


@pytest.fixture
def jobs(hook_settings: Settings) -> JobStore:
    return JobStore(connect(hook_settings), hook_settings.key_prefix)


def finished_job(jobs: JobStore, callback_url: str | None, state: str = "succeeded") -> str:
    record, _ = jobs.create("generate", {"prompts": {"texts": ["a"]}, "callback_url": callback_url}, ["generate"])

    def finish(r: JobRecord) -> None:
        r.state, r.artifacts = state, ["generate/generate.json"]  # type: ignore[assignment]

    jobs.update(record.id, finish)
    return record.id


def test_a_delivery_is_signed_recorded_and_retried_after_a_500(hook_settings: Settings, jobs: JobStore) -> None:
    with Receiver((500,)) as receiver:
        job_id = finished_job(jobs, receiver.url)
        first = deliver(hook_settings, jobs, job_id, "d-1", 1)
        assert first.retry and not first.delivery.ok and first.delivery.status_code == 500
        second = deliver(hook_settings, jobs, job_id, "d-1", 2)
        assert not second.retry and second.delivery.ok and second.delivery.status_code == 200
    record = jobs.get(job_id)
    assert [(d.id, d.attempt, d.status_code, d.ok, d.error) for d in record.deliveries] == [
        ("d-1", 1, 500, False, None), ("d-1", 2, 200, True, None)]
    secret = webhooks.webhook_secret(hook_settings)
    assert len(receiver.requests) == 2
    for headers, body in receiver.requests:
        assert headers["x-eigenshift-event"] == "job.succeeded" and headers["x-eigenshift-delivery"] == "d-1"
        assert headers["content-type"] == "application/json"
        assert headers["host"] == f"127.0.0.1:{receiver.port}"
        assert verify_signature(secret, headers["x-eigenshift-timestamp"], body, headers["x-eigenshift-signature"])
        sent = json.loads(body)
        assert sent["id"] == job_id and sent["state"] == "succeeded" and "deliveries" not in sent
        assert JobRecord.model_validate(sent) == record.model_copy(update={"deliveries": []})
        assert eigenshift.Job.from_json(sent).artifact_names == ("generate/generate.json",)


@pytest.mark.parametrize(("status", "retry"), [(404, False), (410, False), (400, False), (408, True), (429, True),
                                               (503, True), (302, False)])
def test_which_answers_are_retried(hook_settings: Settings, jobs: JobStore, status: int, retry: bool) -> None:
    with Receiver((status,)) as receiver:
        attempt = deliver(hook_settings, jobs, finished_job(jobs, receiver.url, "failed"), "d", 1)
        assert receiver.requests[0][0]["x-eigenshift-event"] == "job.failed"
    assert attempt.retry is retry and not attempt.delivery.ok and attempt.delivery.status_code == status
    assert len(receiver.requests) == 1  # a redirect is not followed
    if status == 302:
        assert attempt.delivery.error == "redirects are not followed"


def test_attempts_stop_at_the_maximum(hook_settings: Settings, jobs: JobStore) -> None:
    with Receiver((500, 500, 500)) as receiver:
        job_id = finished_job(jobs, receiver.url, "cancelled")
        outcomes = [deliver(hook_settings, jobs, job_id, "d", n).retry for n in (1, 2, 3)]
    assert outcomes == [True, True, False]
    assert [d.attempt for d in jobs.get(job_id).deliveries] == [1, 2, 3]
    assert receiver.requests[0][0]["x-eigenshift-event"] == "job.cancelled"


def test_no_answer_is_retried(hook_settings: Settings, jobs: JobStore) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempt = deliver(hook_settings, jobs, finished_job(jobs, f"http://127.0.0.1:{port}/x"), "d", 1)
    assert attempt.retry and attempt.delivery.status_code is None and attempt.delivery.error
    assert not attempt.delivery.ok


def test_delivery_connects_to_the_checked_address_and_refuses_a_rebound_name(hook_settings: Settings,
                                                                             jobs: JobStore) -> None:
    with Receiver() as receiver:
        url = f"http://hooks.test:{receiver.port}/x"
        named = hook_settings.model_copy(update={"webhook_allowed_hosts": ["hooks.test", "127.0.0.1"]})
        ok = deliver(named, jobs, finished_job(jobs, url), "d", 1, resolve=lambda host, port: ["127.0.0.1"])
        assert ok.delivery.ok and receiver.requests[0][0]["host"] == f"hooks.test:{receiver.port}"

        name_only = hook_settings.model_copy(update={"webhook_allowed_hosts": ["hooks.test"]})
        job_id = finished_job(jobs, url)
        refused = deliver(name_only, jobs, job_id, "d", 1, resolve=lambda host, port: ["127.0.0.1"])
        assert not refused.retry and not refused.delivery.ok and refused.delivery.status_code is None
        assert refused.delivery.error and refused.delivery.error.startswith("refused")
        assert len(receiver.requests) == 1  # the refused one never reached it

        off = hook_settings.model_copy(update={"webhook_allowed_hosts": []})  # settings changed since submit
        assert "refused" in (deliver(off, jobs, finished_job(jobs, receiver.url), "d", 1).delivery.error or "")
        assert len(receiver.requests) == 1


# -- queueing at the terminal transitions ----------------------------------------------------------------


def test_a_finished_job_with_a_callback_is_queued_once(jobs: JobStore) -> None:
    sent: list[tuple[str, str]] = []

    def send(job_id: str, delivery_id: str) -> None:
        sent.append((job_id, delivery_id))

    job_id = finished_job(jobs, "http://127.0.0.1:1/x")
    delivery_id = celery_app.queue_notification(jobs, job_id, send)
    assert celery_app.queue_notification(jobs, job_id, send) is None  # a redelivered task queues nothing more
    assert sent == [(job_id, delivery_id)]
    assert celery_app.queue_notification(jobs, finished_job(jobs, None), send) is None
    running, _ = jobs.create("generate", {"callback_url": "http://127.0.0.1:1/x"}, ["generate"])
    assert celery_app.queue_notification(jobs, running.id, send) is None and len(sent) == 1

    def broken(job_id: str, delivery_id: str) -> None:
        raise ConnectionError("broker away")

    other = finished_job(jobs, "http://127.0.0.1:1/x")
    assert celery_app.queue_notification(jobs, other, broken) is None  # logged, never raised
    assert celery_app.queue_notification(jobs, other, send) is not None  # and a later transition tries again


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    sent: list[str] = []
    monkeypatch.setattr(celery_app, "send_notification", lambda job_id, delivery_id: sent.append(job_id))
    yield sent


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_the_runner_queues_the_webhook_when_a_job_ends(hook_settings: Settings, jobs: JobStore,
                                                       queued: list[str], outcome: str) -> None:
    record, _ = jobs.create("generate", {"prompts": {"texts": ["a"]}, "callback_url": "http://127.0.0.1:1/x"},
                            ["generate", "extract"])

    def step(ctx: StepContext) -> StepResult:
        if outcome == "failed" and ctx.record.steps_done:
            raise InputError("no toxic continuations", field="prompts")
        return StepResult()

    run_step(record.id, "generate", step, hook_settings)
    assert queued == []  # one step of two: not over yet
    run_step(record.id, "extract", step, hook_settings)
    assert jobs.get(record.id).state == outcome and queued == [record.id]


def test_the_notify_task_is_registered_under_its_name() -> None:
    from workers.tasks import notify

    assert notify.name == celery_app.NOTIFY_TASK == "eigenshift.notify"
