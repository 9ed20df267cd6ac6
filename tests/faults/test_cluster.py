"""A deployment across hosts: Redis (append-only), S3 (moto), the API and two workers, each on a "host" of
its own (a network namespace). Both workers run steps; when the network link of one is cut in the middle of
a step, its lease expires, the other's heartbeat requeues the job there and it succeeds; all jobs end
`succeeded` and their artifacts are read back through the API host.

The hosts are namespaces joined by veth pairs to a bridge in a hub namespace, on a private /24 chosen per
run; the test process joins through one more veth, and no namespace has a route beyond that subnet."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from safetensors.torch import load

from app.cli import worker_command
from tests.conftest import SHARED_DATA
from tests.faults.conftest import ROOT, child_env, until
from workers.interventions import InterventionRegistry
from workers.jobs import JobStore, connect
from workers.owners import SYSTEM
from workers.redis_server import redis_server_binary
from workers.settings import Settings
from workers.store import open_store

HOSTS = ("redis", "s3", "api", "w1", "w2")  # host i has address .<i + 1> of the subnet; the test process .100
JOB = {"reference_csv": "llama2_7b_rtp_toxic_words.csv", "rows": "0:12", "k": 4, "alpha": 0.5, "batch_size": 16}
JOBS = 6
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
STEP_DONE = re.compile(r"Task eigenshift\.\w+\[[^\]]+\] succeeded in [^:]+: 'done'")


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or a RuntimeError with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> str:
    """The first three octets of a 10.77.N.0/24 that no route or address of this machine's namespace overlaps
    (the default route aside), so the hosts' subnet shadows nothing."""
    used = [ipaddress.ip_network(line.split()[0], strict=False) for line in ip("-4", "route").splitlines()
            if line and not line.startswith("default")]
    used += [ipaddress.ip_network(word, strict=False) for word in ip("-4", "-o", "addr").split() if "/" in word]
    candidates = [n for n in range(1, 255)
                  if not any(ipaddress.ip_network(f"10.77.{n}.0/24").overlaps(net) for net in used)]
    return f"10.77.{random.choice(candidates)}"


class Hosts:
    """The namespaces, their links and the processes started in them; `close` removes all of it."""

    def __init__(self, base: Path) -> None:
        self.token, self.base = secrets.token_hex(3), base
        self.namespaces: list[str] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.cut_off: set[str] = set()
        self.client_link = f"es{self.token}c"
        self.subnet = free_subnet()

    def build(self) -> None:
        self._add_namespace("hub")
        ip("-n", self.namespace("hub"), "link", "add", "br0", "type", "bridge")
        ip("-n", self.namespace("hub"), "link", "set", "br0", "up")
        for host in HOSTS:
            self._add_namespace(host)
            self._link(self.link(host), self.namespace(host))
            ip("-n", self.namespace(host), "link", "set", "lo", "up")
            ip("-n", self.namespace(host), "addr", "add", f"{self.address(host)}/24", "dev", self.link(host))
            ip("-n", self.namespace(host), "link", "set", self.link(host), "up")
        self._link(self.client_link, None)  # the test process's own side, in this machine's namespace
        ip("addr", "add", f"{self.subnet}.100/24", "dev", self.client_link)
        ip("link", "set", self.client_link, "up")

    def namespace(self, host: str) -> str:
        return f"es-{self.token}-{host}"

    def link(self, host: str) -> str:
        return f"es{self.token}{HOSTS.index(host)}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS.index(host) + 1}"

    def _add_namespace(self, host: str) -> None:
        ip("netns", "add", self.namespace(host))
        self.namespaces.append(self.namespace(host))

    def _link(self, name: str, namespace: str | None) -> None:
        """A veth pair: `name` in `namespace` (None: this one), its peer on the hub's bridge."""
        peer, hub = f"{name}h", self.namespace("hub")
        ip("link", "add", name, *(["netns", namespace] if namespace else []), "type", "veth", "peer", "name", peer,
           "netns", hub)
        ip("-n", hub, "link", "set", peer, "master", "br0", "up")

    def start(self, host: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Run `command` on `host`; `ip netns exec` execs it, so the process's pid is the command's."""
        with (self.base / f"{host}.log").open("wb") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *command], cwd=ROOT, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.processes[host] = process
        return process

    def cut(self, host: str) -> None:
        """Take `host`'s only link down: its processes live on, unreachable."""
        ip("-n", self.namespace(host), "link", "set", self.link(host), "down")
        self.cut_off.add(host)

    def log(self, host: str) -> str:
        return (self.base / f"{host}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {host}\n{self.log(host)[-3000:]}" for host in self.processes)

    def close(self) -> None:
        for host, process in reversed(self.processes.items()):  # the workers first, Redis last
            if process.poll() is not None:
                continue
            if host in self.cut_off:  # it would spend its shutdown waiting for Redis
                process.kill()
            else:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        for namespace in reversed(self.namespaces):  # the hub last: deleting it removes the client link too
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.client_link], capture_output=True)


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    for name in PROXY_VARIABLES:  # every request of this test stays on the hosts' subnet
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    try:
        free_subnet()
        ip("netns", "add", probe := f"es-{secrets.token_hex(3)}-probe")
        ip("netns", "delete", probe)
    except (RuntimeError, FileNotFoundError) as error:
        pytest.skip(f"network namespaces cannot be made here: {error}")
    hosts = Hosts(tmp_path)
    try:
        try:
            hosts.build()
        except RuntimeError as error:  # no bridge or veth support, say
            pytest.skip(f"the hosts' network cannot be built here: {error}")
        yield hosts
    finally:
        hosts.close()


def host_settings(hosts: Hosts, data_dir: Path) -> Settings:
    """One host's settings: Redis and S3 at their hosts' addresses, short leases, its own data dir."""
    return Settings(redis_url=f"redis://{hosts.address('redis')}:6379/0", data_dir=data_dir, data_root=SHARED_DATA,
                    store="s3", s3_endpoint_url=f"http://{hosts.address('s3')}:5000", s3_bucket="eigenshift",
                    s3_access_key_id="test", s3_secret_access_key="test", device="cpu", torch_threads=1,
                    heartbeat_s=1, lease_s=6, max_attempts=3)


def host_env(settings: Settings) -> dict[str, str]:
    env = child_env(settings)
    assert settings.s3_endpoint_url is not None and settings.s3_access_key_id is not None
    env.update({"EIGENSHIFT_DATA_ROOT": str(settings.data_root), "EIGENSHIFT_STORE": settings.store,
                "EIGENSHIFT_S3_ENDPOINT_URL": settings.s3_endpoint_url, "EIGENSHIFT_S3_BUCKET": settings.s3_bucket,
                "EIGENSHIFT_S3_ACCESS_KEY_ID": settings.s3_access_key_id, "EIGENSHIFT_S3_SECRET_ACCESS_KEY": "test",
                "NO_PROXY": "*", "no_proxy": "*"})  # (the test deleted the proxy variables)
    return env


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}


def answers(check: Callable[[], object]) -> bool:
    """Whether `check` is true, counting a connection that fails as false."""
    try:
        return bool(check())
    except (OSError, redis.RedisError, httpx.HTTPError):
        return False


def start_services(hosts: Hosts) -> tuple[JobStore, Settings]:
    """Redis (append-only), S3 with its bucket, the API; the job store as seen from the test process."""
    redis_dir = hosts.base / "redis-data"
    redis_dir.mkdir()
    hosts.start("redis", [str(redis_server_binary()), "--bind", hosts.address("redis"), "--port", "6379",
                          "--protected-mode", "no", "--dir", str(redis_dir), "--save", "", "--appendonly", "yes",
                          "--daemonize", "no"], plain_env())
    hosts.start("s3", [sys.executable, "-m", "moto.server", "-H", hosts.address("s3"), "-p", "5000"], plain_env())
    api = host_settings(hosts, hosts.base / "api-data")
    client = connect(api)
    until(lambda: answers(client.ping), "Redis")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    until(lambda: answers(lambda: httpx.get(str(api.s3_endpoint_url), timeout=2, trust_env=False)), "S3")
    boto3.client("s3", endpoint_url=api.s3_endpoint_url, region_name=api.s3_region, aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=api.s3_bucket)
    hosts.start("api", [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                        "--host", hosts.address("api"), "--port", "8000", "--log-level", "warning"], host_env(api))
    return JobStore(client, api.key_prefix), api


def start_workers(hosts: Hosts, jobs: JobStore) -> dict[str, Settings]:
    """w1 and w2, each on its host with its own data dir, consuming the steps' and the webhooks' queues; their
    settings, once both beat. A worker's name is `<hostname>-<pid>` (namespaces keep the machine's hostname)."""
    workers = {host: host_settings(hosts, hosts.base / f"{host}-data") for host in ("w1", "w2")}
    for host, settings in workers.items():
        command = [*worker_command(f"{settings.queue},{settings.webhook_queue}"), "-n", f"{host}@%h"]
        hosts.start(host, command, host_env(settings))
    names = {worker_name(hosts, host) for host in workers}
    until(lambda: names <= set(jobs.live_workers()) or any(p.poll() is not None for p in hosts.processes.values()),
          "both workers to beat")
    assert names <= set(jobs.live_workers()), hosts.logs()
    return workers


def worker_name(hosts: Hosts, host: str) -> str:
    return f"{socket.gethostname()}-{hosts.processes[host].pid}"


def steps_done(hosts: Hosts, host: str) -> int:
    """Steps this worker completed, by its Celery log."""
    return len(STEP_DONE.findall(hosts.log(host)))


def jobs_seen(settings: Settings) -> set[str]:
    """Jobs this worker ran a step of: each step works in <data_dir>/work/<job id>/."""
    return {p.name for p in settings.work_dir.iterdir()} if settings.work_dir.is_dir() else set()


def busy_worker(hosts: Hosts, jobs: JobStore, ids: list[str]) -> tuple[str, str] | None:
    """(worker host, job id) once both workers have finished a step and one holds a job early in a step, before
    its last progress report (so the cut lands mid-step, not between its record and its lease's release);
    None until then."""
    if min(steps_done(hosts, host) for host in ("w1", "w2")) == 0:
        return None
    for job_id in ids:
        record = jobs.get(job_id)
        lease = jobs.redis.get(f"{jobs.prefix}:lease:{job_id}")  # "<worker name>-<task token>"
        if record.state != "running" or lease is None or record.progress.done >= max(record.progress.total, 1):
            continue
        for host in ("w1", "w2"):
            if lease.startswith(f"{worker_name(hosts, host)}-"):
                return host, job_id
    return None


def test_workers_on_other_hosts_share_the_jobs_and_take_over_a_cut_off_one(hosts: Hosts) -> None:
    jobs, api = start_services(hosts)
    workers = start_workers(hosts, jobs)
    with httpx.Client(base_url=f"http://{hosts.address('api')}:8000", timeout=30, trust_env=False) as http:
        until(lambda: answers(lambda: http.get("/readyz").status_code == 200)
              or hosts.processes["api"].poll() is not None, "the API to be ready")
        http.headers["Authorization"] = f"Bearer {api.api_key_path.read_text().strip()}"
        submitted = [http.post("/jobs/reconstruct", json=JOB) for _ in range(JOBS)]
        assert [s.status_code for s in submitted] == [202] * JOBS, submitted[0].text
        ids = [s.json()["id"] for s in submitted]

        found: list[tuple[str, str]] = []

        def busy_or_all_done() -> bool:
            found[:] = [busy] if (busy := busy_worker(hosts, jobs, ids)) else []
            return bool(found) or all(jobs.get(i).state == "succeeded" for i in ids)

        until(busy_or_all_done, "both workers to finish a step and one to start another")
        assert found, f"every job ended before a worker could be cut off\n{hosts.logs()}"
        (cut, job_id), = found
        hosts.cut(cut)
        survivor = "w2" if cut == "w1" else "w1"

        until(lambda: all(jobs.get(i).state in ("succeeded", "failed", "cancelled") for i in ids), "every job to end")
        records = {i: http.get(f"/jobs/{i}").json() for i in ids}
        assert [r["state"] for r in records.values()] == ["succeeded"] * JOBS, (records, hosts.logs())
        assert records[job_id]["worker_losses"] == 1  # lost once, then run again on the other host
        assert job_id in jobs_seen(workers[cut]) & jobs_seen(workers[survivor])
        assert steps_done(hosts, "w1") > 0 and steps_done(hosts, "w2") > 0
        assert jobs.in_flight_without_lease() == []
        assert worker_name(hosts, cut) not in jobs.live_workers()

        interventions = InterventionRegistry(jobs.redis, open_store(api), api.key_prefix)
        for i, record in records.items():  # the artifacts, read from S3 through the API host
            data = http.get(f"/jobs/{i}/artifacts/reconstruct/intervention.safetensors")
            assert data.status_code == 200, data.text
            assert http.get(f"/interventions/{record['intervention_id']}").status_code == 200
            registered = interventions.get(record["intervention_id"], SYSTEM)  # the digests its worker recorded
            assert hashlib.sha256(data.content).hexdigest() == registered.sha256["intervention.safetensors"]
            assert load(data.content)
