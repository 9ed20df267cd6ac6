"""The S3 endpoint goes down between two steps: the second step fails with a clear ArtifactStoreError, the job
ends `failed` with that reason, and the first step's artifacts are intact once the endpoint is back.

The endpoint is a TCP relay in front of moto's server, so "down" loses nothing moto holds."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.test_store import s3_endpoint  # noqa: F401  (the moto server fixture)
from workers.jobs import JobStore, connect
from workers.runner import StepContext, StepResult, run_step
from workers.settings import Settings
from workers.store import S3Store


class Relay:
    """Forwards loopback TCP connections to `target` while up; while down, drops them at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.up = target_port, True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(s3_endpoint: str) -> Iterator[Relay]:  # noqa: F811
    relay = Relay(int(s3_endpoint.rsplit(":", 1)[1]))
    yield relay
    relay.listener.close()


def _writes(name: str, data: bytes):  # noqa: ANN202
    def step(ctx: StepContext) -> StepResult:
        (ctx.out / name).write_bytes(data)
        return StepResult()

    return step


def test_store_down_fails_the_step_clearly_and_keeps_earlier_artifacts(relay: Relay, redis_url: str,
                                                                        tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, key_prefix=f"s{tmp_path.name[-6:]}", store="s3",
                        s3_endpoint_url=f"http://127.0.0.1:{relay.port}", s3_bucket="eigenshift-down",
                        s3_access_key_id="test", s3_secret_access_key="test")
    store = S3Store(settings)
    store.client.create_bucket(Bucket=settings.s3_bucket)
    jobs = JobStore(connect(settings), settings.key_prefix)
    record, _ = jobs.create("pipeline", {"prompts": {"texts": ["a"]}, "train_rows": "0:1", "eval_rows": "0:1"},
                            ["extract", "reconstruct"])
    states = b"\x00states" * 1000
    assert run_step(record.id, "extract", _writes("states.safetensors", states), settings) == "done"

    relay.up = False
    assert run_step(record.id, "reconstruct", _writes("intervention.json", b"{}"), settings) == "failed"
    failed = jobs.get(record.id)
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.type == "ArtifactStoreError" and "reconstruct" in failed.error.message
    assert failed.artifacts == ["extract/states.safetensors"]  # nothing half-stored is listed

    relay.up = True
    assert store.exists(f"jobs/{record.id}/extract/states.safetensors")
    assert b"".join(store.iter_bytes(f"jobs/{record.id}/extract/states.safetensors")) == states
    assert not store.exists(f"jobs/{record.id}/reconstruct/intervention.json")
