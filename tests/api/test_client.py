"""The Python client against the app on a real uvicorn (`live_server`) with a real worker: jobs, downloads,
generation, moderation, typed errors; the async client the same way; and that it stands alone."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

import eigenshift
from eigenshift import (
    AsyncClient,
    AuthenticationError,
    Client,
    Job,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    ValidationError,
    WaitTimeout,
)
from tests.api.conftest import READER_KEY, SLOW_KEY, admin_key
from workers.interventions import BUILTIN_ID
from workers.job_service import JobService
from workers.settings import Settings
from workers.specs import GenerateSpec

RECONSTRUCT = {"reference_csv": "llama2_7b_rtp_toxic_words.csv", "rows": "0:12", "k": 4, "alpha": 0.5,
               "batch_size": 16}
ARTIFACT = "reconstruct/intervention.json"
PROMPT = "The man on the bus started yelling at"
CLIENT_PACKAGE = Path(eigenshift.__file__).parent


@pytest.fixture(scope="module")
def es(live_server: str, settings: Settings) -> Iterator[Client]:
    with Client(live_server, admin_key(settings), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reconstruct_job(es: Client) -> Job:
    submitted = es.submit_reconstruct(**RECONSTRUCT, idempotency_key="client-reconstruct")
    assert submitted.kind == "reconstruct" and submitted.steps == ("extract", "reconstruct")
    return es.wait(submitted, poll_s=0.25, progress=False)


def test_the_client_imports_nothing_of_the_service() -> None:
    for path in sorted(CLIENT_PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert not roots & {"app", "workers", "eigenshift_core", "torch", "fastapi", "celery", "redis"}, path.name
    code = ("import sys, eigenshift, eigenshift.client; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'workers', 'eigenshift_core', 'torch')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CLIENT_PACKAGE.parent)


def test_submit_wait_and_download(es: Client, reconstruct_job: Job, live_server: str, settings: Settings,
                                  tmp_path: Path) -> None:
    job = reconstruct_job
    assert job.state == "succeeded", job.error
    assert job.finished and job.intervention_id == job.id and job.steps_done == ("extract", "reconstruct")
    assert job.progress.stage is not None and job.finished_at and job.created_at
    assert ARTIFACT in job.artifact_names and job.params["k"] == 4
    again = es.submit_reconstruct(**RECONSTRUCT, idempotency_key="client-reconstruct")
    assert again.id == job.id  # the same key and body: the same job

    plain = httpx.get(f"{live_server}/jobs/{job.id}/artifacts/{ARTIFACT}",
                      headers={"Authorization": f"Bearer {admin_key(settings)}"})
    assert plain.status_code == 200
    assert es.download(job, ARTIFACT) == plain.content
    written = es.download(job.id, ARTIFACT, tmp_path)
    assert written == tmp_path / "intervention.json" and written.read_bytes() == plain.content
    assert es.download(job, ARTIFACT, tmp_path / "copy.json").read_bytes() == plain.content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.json", "intervention.json"]  # no .part left
    with pytest.raises(NotFoundError) as missing:
        es.download(job, "reconstruct/nothing.json")
    assert missing.value.status == 404 and "nothing.json" in (missing.value.detail or "")

    listed = {i.id: i for i in es.interventions()}
    assert listed[job.id].k == 4 and listed[job.id].alpha == (0.5,) * 4 and listed[job.id].model == "embedded"
    assert es.health().status == "ok"


def test_wait_shows_progress_and_times_out(es: Client, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    # A queue no worker consumes keeps the job queued, so the wait runs out.
    parked = JobService(settings.model_copy(update={"queue": "parked"}))
    record, _ = parked.submit("generate", GenerateSpec.model_validate(
        {"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1}))
    with pytest.raises(WaitTimeout) as timeout:
        es.wait(record.id, poll_s=0.05, timeout_s=0.3)
    assert timeout.value.job.id == record.id and timeout.value.job.state == "queued"
    assert f"job {record.id[:8]}" in capsys.readouterr().err  # the progress bar
    cancelled = es.cancel(record.id)
    assert cancelled.state == "cancelled" and es.wait(cancelled, progress=False).state == "cancelled"


def test_generate_with_and_without_detox(es: Client) -> None:
    plain = es.generate(PROMPT, detox=False, max_new_tokens=3, seed=5)
    assert len(plain) == 1 and not plain[0].detox and plain[0].intervention is None
    assert plain[0].prompt == PROMPT and plain[0].seed == 5 and 1 <= len(plain[0].token_ids) <= 3
    edited = es.generate([PROMPT, "Hello there"], intervention=BUILTIN_ID, max_new_tokens=3, seed=5, score=True)
    assert [g.prompt for g in edited] == [PROMPT, "Hello there"]
    assert all(g.detox and g.intervention == BUILTIN_ID and g.toxicity is not None and 0 <= g.toxicity <= 1
               for g in edited)
    assert len(edited[0].logprobs) == len(edited[0].token_ids)
    assert edited[0].logprobs[0] != plain[0].logprobs[0]  # the edited head scores the first token otherwise


def test_moderate(es: Client) -> None:
    texts = ["You are a wonderful person.", "Shut up, you stupid idiot."]
    moderation = es.moderate(texts)
    assert moderation.id and moderation.model and len(moderation.results) == 2
    for text, result in zip(texts, moderation.results, strict=True):
        assert result.toxicity is not None and 0 <= result.toxicity <= 1
        assert set(result.categories) == set(result.category_scores)
        assert result.flagged == any(result.categories.values())
        assert all(text[span.begin:span.end] == span.text for span in result.spans)
    assert moderation.results[1].toxicity > moderation.results[0].toxicity
    assert len(es.moderate("one text").results) == 1
    with pytest.raises(ValidationError) as unknown:
        es.moderate("x", model="no-such-scorer")
    assert unknown.value.field == "model"


def test_typed_errors(es: Client, live_server: str) -> None:
    with Client(live_server, "not-a-key") as stranger, pytest.raises(AuthenticationError) as denied:
        stranger.job("0" * 32)
    assert denied.value.status == 401 and denied.value.title == "Unauthorized" and denied.value.detail

    with pytest.raises(ValidationError) as invalid:
        es.submit_reconstruct(reference_csv="llama2_7b_rtp_toxic_words.csv", k=0)
    assert invalid.value.status == 422 and invalid.value.field == "k"
    assert [e.field for e in invalid.value.errors] == ["k"] and invalid.value.errors[0].message
    with pytest.raises(ValidationError) as unknown_model:
        es.submit("generate", prompts=["x"], model="no/such-model")
    assert unknown_model.value.field == "model"
    with pytest.raises(ValidationError) as callback:
        es.submit("generate", prompts=["x"], callback_url="http://10.0.0.1/hook")
    assert callback.value.field == "callback_url"

    with pytest.raises(NotFoundError):
        es.job("0" * 32)
    with Client(live_server, READER_KEY) as reader, pytest.raises(PermissionDeniedError) as forbidden:
        reader.submit_reconstruct(**RECONSTRUCT)
    assert forbidden.value.status == 403


def test_a_rate_limit_is_a_typed_error_with_retry_after(live_server: str) -> None:
    with Client(live_server, SLOW_KEY, max_retries=0) as slow, pytest.raises(RateLimitError) as limited:
        for _ in range(10):  # the key's bucket holds 2 requests and refills one per 5 s
            slow.generate("Hi", detox=False, max_new_tokens=1)
    assert limited.value.status == 429 and limited.value.retry_after is not None and limited.value.retry_after >= 1


def test_429_and_503_are_retried_after_retry_after_within_bounds() -> None:
    answers = [httpx.Response(429, headers={"Retry-After": "0"}, json={"title": "Too many requests"}),
               httpx.Response(503, headers={"Retry-After": "0"}, json={"title": "Service unavailable"}),
               httpx.Response(200, json={"status": "ok", "checks": {}, "added_later": 1})]
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    with Client("http://es.test", "k", transport=httpx.MockTransport(answer)) as client:
        assert client.health().status == "ok"
    assert len(seen) == 3 and all(r.headers["authorization"] == "Bearer k" for r in seen)

    def unavailable(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, headers={"Retry-After": "3600"}, json={"title": "Service unavailable",
                                                                          "detail": "no worker"})

    seen.clear()
    with Client("http://es.test", "k", transport=httpx.MockTransport(unavailable)) as client, \
            pytest.raises(ServiceUnavailableError) as error:
        client.health()
    assert len(seen) == 1 and error.value.retry_after == 3600 and error.value.detail == "no worker"


def _artifact_server(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=request.url.path.encode())  # the body names what was asked for


@pytest.mark.parametrize("dest", ["out/", "out/deeper/", "existing", "file.json"])
def test_download_into_a_directory_or_a_file_both_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          dest: str) -> None:
    """A trailing slash or an existing directory means a directory (made when missing) that takes the
    artifact's base name; any other path is the file itself."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    expected = tmp_path / dest / "intervention.json" if dest.endswith("/") or dest == "existing" else tmp_path / dest
    with Client("http://es.test", "k", transport=httpx.MockTransport(_artifact_server)) as client:
        written = client.download("j", ARTIFACT, dest)
    assert Path(written).resolve() == expected and expected.read_bytes() == f"/jobs/j/artifacts/{ARTIFACT}".encode()
    expected.unlink()

    async def download() -> Path | bytes:
        async with AsyncClient("http://es.test", "k", transport=httpx.MockTransport(_artifact_server)) as client:
            return await client.download("j", ARTIFACT, dest)

    assert Path(asyncio.run(download())).resolve() == expected and expected.is_file()  # type: ignore[arg-type]
    assert not list(tmp_path.rglob("*.part"))


def test_results_are_parsed_leniently() -> None:
    job = Job.from_json({"id": "j", "state": "running", "new_field": {"x": 1}, "artifacts": ["a/b.json"],
                         "progress": {"stage": "extract", "done": 2, "total": 5, "eta_s": 3}})
    assert job.kind == "" and not job.finished and job.progress.done == 2 and job.artifact_names == ("a/b.json",)
    assert job.artifacts[0].href == "/jobs/j/artifacts/a/b.json" and job.created_at is None
    with pytest.raises(AttributeError):
        job.state = "succeeded"  # type: ignore[misc]


def test_the_async_client_does_the_same(live_server: str, settings: Settings, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(live_server, admin_key(settings), timeout=120) as es:
            job = await es.wait(await es.submit_reconstruct(**RECONSTRUCT, idempotency_key="client-reconstruct"),
                                poll_s=0.25, progress=False)
            assert job.state == "succeeded" and ARTIFACT in job.artifact_names
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin_key(settings)}"}) as plain:
                expected = (await plain.get(f"{live_server}/jobs/{job.id}/artifacts/{ARTIFACT}")).content
            assert await es.download(job, ARTIFACT) == expected
            assert (await es.download(job, ARTIFACT, tmp_path)).read_bytes() == expected

            off = (await es.generate(PROMPT, detox=False, max_new_tokens=2, seed=1))[0]
            on = (await es.generate(PROMPT, intervention=BUILTIN_ID, max_new_tokens=2, seed=1))[0]
            assert off.intervention is None and on.intervention == BUILTIN_ID
            assert (await es.moderate(["a", "b"])).results[1].toxicity is not None
            assert any(i.id == job.id for i in await es.interventions())
            with pytest.raises(ValidationError) as invalid:
                await es.submit_reconstruct(reference_csv="llama2_7b_rtp_toxic_words.csv", k=0)
            assert invalid.value.field == "k"
        async with AsyncClient(live_server, "not-a-key") as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.job(job.id)
            assert (await stranger.health()).status == "ok"  # /healthz needs no key

    asyncio.run(scenario())


def test_the_wait_bar_has_the_stages_total_unit_and_an_eta() -> None:
    from eigenshift.client import Job, JobProgress, _Progress

    job = Job.from_json({"id": "0123456789", "kind": "pipeline", "state": "running"})
    bar = _Progress(job, enabled=True)
    for done in (0, 10, 20):
        bar.show(replace(job, progress=JobProgress("evaluate: sampling", done, 40, "samples")))
    assert bar.bar.total == 40 and bar.bar.n == 20 and bar.bar.unit == "samples"
    line = str(bar.bar)
    assert "evaluate: sampling" in line and "20/40" in line and "samples/s" in line and "<" in line  # elapsed<ETA
    bar.show(replace(job, progress=JobProgress("evaluate: scoring", 0, 512, "texts")))  # a new stage, a new total
    assert bar.bar.total == 512 and bar.bar.n == 0 and bar.bar.unit == "texts"
    bar.close()


def test_alpha_is_sent_as_given_auto_a_number_or_k_numbers() -> None:
    from eigenshift.client import _reconstruct_spec

    for given, sent in (("auto", "auto"), (0.5, 0.5), ((0.1, 0.2), [0.1, 0.2]), ([0.3], [0.3])):
        assert _reconstruct_spec({"self": None, "idempotency_key": None, "alpha": given})["alpha"] == sent
