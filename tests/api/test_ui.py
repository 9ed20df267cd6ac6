"""The web console: its static files (no key needed), then the pages in real headless Chromium against the
live server: submit and follow a job, cancel one, read an intervention and its plot, run the playground,
and the messages for a refused key.

Screenshots go to build/screenshots/ under the repository root."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from safetensors.torch import load

from app.main import create_app
from app.ui import UI_DIR
from tests.api.conftest import READER_KEY, ROOT, admin_key
from workers.interventions import report_summary as summary
from workers.job_service import JobService
from workers.settings import Settings
from workers.specs import GenerateSpec

CHROMIUM = "/usr/bin/chromium"
# Without these the closed network makes Chromium wait on services it cannot reach.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "build" / "screenshots"
DEADLINE_MS = 600_000  # only stops a hung run; nothing here asserts how fast anything is
WAIT_MS = 120_000  # the same for each page's answer
TERMINAL = re.compile(r"^(succeeded|failed|cancelled)$")
DEFAULT_REPORT = ROOT / "eigenshift_core" / "defaults" / "embedded" / "report.json"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


# ---------------------------------------------------------------------------------------------------------
# Static files, no browser


@pytest.fixture(scope="module")
def anonymous(settings: Settings) -> TestClient:
    """The app with no key and no lifespan: serving static files needs neither a model nor Redis."""
    return TestClient(create_app(settings))


def test_console_is_served_without_a_key(anonymous: TestClient) -> None:
    redirect = anonymous.get("/ui", follow_redirects=False)
    assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/ui/")
    page = anonymous.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (UI_DIR / "index.html").read_bytes()
    assert '<script type="module" src="app.js"></script>' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("name", sorted(p.name for p in UI_DIR.iterdir() if p.suffix in MEDIA_TYPES))
def test_each_console_file_has_its_media_type(anonymous: TestClient, name: str) -> None:
    answer = anonymous.get(f"/ui/{name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"].split(";")[0] == MEDIA_TYPES[Path(name).suffix]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.content == (UI_DIR / name).read_bytes()


def test_console_loads_only_its_own_files() -> None:
    # Nothing outside loopback is reachable where it runs: every import and link is a file beside it.
    for path in UI_DIR.iterdir():
        text = path.read_text()
        references = re.findall(r"""(?:from|import)\s*\(?\s*["']([^"']+)["']|(?:src|href)=["']([^"'#:]+)["']""", text)
        for found in (a or b for a, b in references):
            assert (UI_DIR / found).is_file(), f"{path.name} refers to missing {found}"
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"{path.name} names an outside URL"


def test_a_missing_console_file_is_a_problem_404(anonymous: TestClient) -> None:
    answer = anonymous.get("/ui/missing.js")
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/problem+json"


# ---------------------------------------------------------------------------------------------------------
# The pages, in Chromium


@dataclass
class Console:
    page: Page
    script_errors: list[str] = field(default_factory=list)

    def check_no_script_errors(self) -> None:
        assert self.script_errors == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def open_console(browser: Browser, live_server: str) -> Iterator[Callable[[str, str], Console]]:
    """Open the console in a fresh browser context (empty local storage) and enter `key`."""
    contexts: list[BrowserContext] = []

    def open_with(key: str, route: str = "#/jobs") -> Console:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        contexts.append(context)
        context.set_default_timeout(WAIT_MS)
        console = Console(context.new_page())
        console.page.on("pageerror", lambda error: console.script_errors.append(str(error)))
        console.page.on("console", lambda message: console.script_errors.append(message.text)
                        if "Content Security Policy" in message.text else None)
        console.page.goto(f"{live_server}/ui/{route}")
        expect(console.page.locator("#key-panel")).to_be_visible()
        console.page.locator("#api-key").fill(key)
        console.page.get_by_role("button", name="Use this key").click()
        return console

    yield open_with
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name, full_page=True)


@pytest.fixture(scope="module")
def submitted(open_console: Callable[[str, str], Console], settings: Settings) -> tuple[Console, str]:
    """A reconstruct job submitted from the jobs page's form, followed in the list until it ended."""
    console = open_console(admin_key(settings), "#/jobs")
    page = console.page
    page.get_by_label("Reference CSV (teacher-forced, no generation)").check()
    page.get_by_label("Rows").fill("0:24")
    page.get_by_label("k (directions)").fill("8")
    page.get_by_label("α", exact=True).fill("0")
    page.get_by_role("button", name="Submit reconstruct job").click()
    expect(page.locator("#status")).to_contain_text("Queued reconstruct job")
    job_id = re.search(r"Queued reconstruct job (\S+)\.", page.locator("#status").inner_text()).group(1)
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_have_attribute("data-state", TERMINAL, timeout=DEADLINE_MS)
    return console, job_id


def test_jobs_page_submits_and_follows_a_job(submitted: tuple[Console, str], client: TestClient,
                                             tmp_path: Path) -> None:
    console, job_id = submitted
    page = console.page
    job = client.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    assert job["params"]["reference_csv"] == "llama2_7b_rtp_toxic_words.csv" and job["params"]["k"] == 8

    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(row.locator(".state")).to_have_text("succeeded")
    bar = row.locator("progress")
    assert bar.evaluate("bar => bar.value === bar.max")
    expect(row.locator(".steps")).to_have_text("extract ✓ → reconstruct ✓")
    expect(row.get_by_role("link", name="Intervention")).to_have_attribute("href", f"#/interventions/{job_id}")
    assert row.get_by_role("button", name=re.compile("^Cancel")).count() == 0

    # An artifact downloads with the key (fetch + blob) and is the job's own file.
    row.locator(".artifacts summary").click()
    with page.expect_download() as download:
        row.get_by_role("button", name="reconstruct/intervention.json").click()
    saved = tmp_path / "intervention.json"
    download.value.save_as(saved)
    assert saved.read_bytes() == client.get(f"/jobs/{job_id}/artifacts/reconstruct/intervention.json").content
    assert json.loads(saved.read_text())["k"] == 8
    screenshot(page, "console-jobs.png")
    console.check_no_script_errors()


def test_jobs_page_cancels_a_queued_job(submitted: tuple[Console, str], client: TestClient,
                                        settings: Settings) -> None:
    console, _ = submitted
    # A queue no worker consumes keeps the job queued until the console cancels it.
    parked = JobService(settings.model_copy(update={"queue": "parked"}))
    record, _ = parked.submit("generate", GenerateSpec.model_validate(
        {"prompts": {"texts": ["x"]}, "samples": 1, "max_new_tokens": 1}))
    row = console.page.locator(f'tr[data-job-id="{record.id}"]')
    expect(row).to_have_attribute("data-state", "queued")
    row.get_by_role("button", name=f"Cancel job {record.id}").click()
    expect(row).to_have_attribute("data-state", "cancelled")
    assert client.get(f"/jobs/{record.id}").json()["state"] == "cancelled"
    console.check_no_script_errors()


def js_number(value: float, digits: int) -> str:
    """The console's `formatNumber` for ordinary magnitudes: Number(value.toPrecision(digits)).toString()."""
    rounded = float(f"{value:.{digits}g}")
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def test_intervention_page_plots_each_direction_and_the_report(
        submitted: tuple[Console, str], open_console: Callable[[str, str], Console], client: TestClient,
        settings: Settings) -> None:
    _, job_id = submitted
    record = client.get(f"/interventions/{job_id}").json()
    # The report's headline figures, kept with the intervention as the evaluate step keeps them.
    JobService(settings).interventions.set_metrics(job_id, summary(json.loads(DEFAULT_REPORT.read_text())))
    tensors = load(client.get(f"/jobs/{job_id}/artifacts/reconstruct/intervention.safetensors").content)
    indices = tensors["indices"].tolist()
    delta = tensors["delta"][tensors["indices"]].tolist()

    console = open_console(admin_key(settings), "#/interventions")
    page = console.page
    page.locator(f'tr[data-intervention-id="{job_id}"]').get_by_role("link", name=job_id).click()
    expect(page.locator("h1")).to_contain_text(job_id)
    plot = page.locator("svg.direction-plot")
    expect(plot).to_be_visible()
    assert plot.locator(".delta-mark").count() == plot.locator(".alpha-mark").count() == record["k"] == 8
    # The marks carry the tensors' values, in selection order: the sign of each delta and each spectral index.
    signs = plot.locator(".delta-mark").evaluate_all("marks => marks.map(m => m.classList.contains('positive'))")
    assert signs == [d >= 0 for d in delta]
    shown = page.locator(".direction-values tbody tr td:nth-child(2)").all_text_contents()
    assert [int(i) for i in shown] == indices

    report = page.locator("#report-table")
    figures = json.loads(DEFAULT_REPORT.read_text())
    for arm in ("baseline", "intervention"):
        rate = figures[arm]["toxicity_rate"]
        expect(report.locator('[data-metric="toxicity_rate"]')).to_contain_text(
            f"{js_number(rate['value'], 4)} (CI {js_number(rate['low'], 3)}–{js_number(rate['high'], 3)})")
    expect(report.locator('[data-metric="perplexity"]')).to_contain_text(js_number(figures["baseline"]["perplexity"], 4))
    expect(report.locator('[data-metric="toxicity_reduction"]')).to_contain_text(
        f"{js_number(figures['toxicity_reduction']['value'], 4)} %")
    screenshot(page, "console-intervention.png")

    active_before = next(i["id"] for i in client.get("/interventions").json()["data"]
                         if i["active"] and i["model"] == record["model"])
    try:
        page.get_by_role("button", name="Activate").click()
        expect(page.locator(".active-state")).to_contain_text("the default for detoxified embedded generation")
        expect(page.get_by_role("button", name="Activate")).to_be_hidden()
        assert client.get(f"/interventions/{job_id}").json()["active"] is True
    finally:  # other tests expect the default they started with
        client.post(f"/interventions/{active_before}/activate")
    console.check_no_script_errors()


def test_playground_shows_both_outputs_scored_and_escaped(open_console: Callable[[str, str], Console],
                                                          client: TestClient, settings: Settings) -> None:
    prompt = "The man on the <b>bus</b> started yelling at"  # markup must show as text
    console = open_console(admin_key(settings), "#/playground")
    page = console.page
    page.locator("#prompt").fill(prompt)
    page.get_by_label("New tokens").fill("8")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Generate both").click()
    outputs = page.locator("#outputs")
    expect(outputs).to_have_attribute("data-highlighting", re.compile("^(on|off)$"))

    items = [{"prompt": prompt, "max_new_tokens": 8, "temperature": 0, "seed": 7, "detox": detox} for detox in (False, True)]
    expected = client.post("/generate", json={"items": items, "score": True}).json()["data"]
    moderation = client.post("/v1/moderations", json={"input": [g["text"] for g in expected]})
    for side, generation in zip(("off", "on"), expected, strict=True):
        column = outputs.locator(f'.output[data-detox="{side}"]')
        assert column.locator(".prompt").text_content() == prompt
        assert column.locator(".continuation").text_content() == generation["text"]
        assert float(column.locator(".score-value").inner_text()) == pytest.approx(generation["toxicity"], rel=5e-3)
        expect(column.locator(".meta")).to_contain_text(f"intervention {generation['intervention']}"
                                                        if generation["detox"] else "no intervention")
    assert outputs.locator("b").count() == 0

    # Highlights are exactly the moderation spans; without the route the console says so and marks nothing.
    if moderation.status_code == 404:
        expect(outputs).to_have_attribute("data-highlighting", "off")
        expect(page.locator("#highlight-note")).to_contain_text("no POST /v1/moderations")
        assert outputs.locator("mark").count() == 0
    else:
        assert moderation.status_code == 200, moderation.text
        expect(outputs).to_have_attribute("data-highlighting", "on")
        for side, result in zip(("off", "on"), moderation.json()["results"], strict=True):
            spans = sorted((s for s in result["eigenshift"]["spans"] if s["score"] > 0), key=lambda s: s["begin"])
            marks = outputs.locator(f'.output[data-detox="{side}"] mark').all_text_contents()
            assert marks == [s["text"] for s in spans]
    screenshot(page, "console-playground.png")
    console.check_no_script_errors()


def test_highlighting_escapes_text_and_counts_code_points(open_console: Callable[[str, str], Console],
                                                         settings: Settings) -> None:
    console = open_console(admin_key(settings), "#/playground")
    text = "😀 <img src=x onerror=alert(1)> idiot!"
    rendered = console.page.evaluate("""async (text) => {
        const { highlighted, segments } = await import("./highlight.js");
        const box = document.createElement("div");
        box.append(...highlighted(text, [{ begin: 31, end: 36, score: 2.5, text: "idiot" },
                                         { begin: 32, end: 34, score: 1, text: "di" },
                                         { begin: 30, end: 99, score: 1, text: "beyond" }]));
        return { marks: [...box.querySelectorAll("mark")].map((m) => m.textContent),
                 images: box.querySelectorAll("img").length, text: box.textContent,
                 joined: segments(text, [{ begin: 5, end: 2 }, null, { begin: 0, end: 1 }]).map((p) => p.text).join("") };
    }""", text)
    assert rendered == {"marks": ["idiot"], "images": 0, "text": text, "joined": text}
    console.check_no_script_errors()


def test_a_wrong_key_shows_the_401_message_and_asks_again(open_console: Callable[[str, str], Console]) -> None:
    console = open_console("not-a-key", "#/jobs")
    error = console.page.locator("#error")
    expect(error).to_contain_text("The API key was refused (401 Unauthorized)")
    expect(error).to_contain_text("a valid API key is required")
    expect(console.page.locator("#key-panel")).to_be_visible()
    console.check_no_script_errors()


def test_a_key_without_the_scope_shows_the_403_message(open_console: Callable[[str, str], Console]) -> None:
    console = open_console(READER_KEY, "#/jobs")
    page = console.page
    # Reading is allowed, and a read-only key owns no job: it sees none of the other keys' jobs.
    expect(page.locator("#jobs-summary")).to_contain_text("No jobs yet")
    page.get_by_role("button", name="Submit reconstruct job").click()
    expect(page.locator("#error")).to_contain_text("This key is not allowed to do that (403 Forbidden)")
    expect(page.locator("#error")).to_contain_text("jobs:write")
    messages = page.evaluate("""async () => {
        const { ApiError, describeError } = await import("./api.js");
        return describeError(new ApiError(429, "Too many requests", "rate limit exceeded.", 3));
    }""")
    assert messages == "Too many requests with this key (429 Too many requests). rate limit exceeded. Try again in 3 s."

    # An evaluate job prefilled from an intervention's page; a body that is not JSON never leaves the page.
    page.goto(page.url.split("#")[0] + "#/jobs?evaluate=embedded-default")
    body = page.locator("#json-body")
    expect(body).to_be_visible()
    assert json.loads(body.input_value())["intervention_id"] == "embedded-default"
    assert page.locator("#json-kind").input_value() == "evaluate"
    body.fill("{not json")
    page.get_by_role("button", name="Submit job", exact=True).click()
    expect(page.locator("#error")).to_contain_text("The body is not valid JSON")
    console.check_no_script_errors()


def test_the_key_is_kept_across_reloads(open_console: Callable[[str, str], Console], settings: Settings) -> None:
    console = open_console(admin_key(settings), "#/jobs")
    page = console.page
    expect(page.locator("#jobs-summary")).to_contain_text("Showing")
    page.reload()
    expect(page.locator("#jobs-summary")).to_contain_text("Showing")
    expect(page.locator("#key-panel")).to_be_hidden()
    page.get_by_role("button", name="Forget key").click()
    expect(page.locator("#key-panel")).to_be_visible()
    assert page.evaluate("localStorage.length") == 0
    console.check_no_script_errors()


def _as_shown(default: object) -> str:
    """A default as the form shows it (JavaScript's String(): 1.0 is "1"; a list joined with ", ")."""
    if isinstance(default, list):
        return ", ".join(_as_shown(v) for v in default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return "" if default is None else str(default)


def test_the_job_form_starts_at_the_defaults_of_the_served_openapi(open_console: Callable[[str, str], Console],
                                                                   client: TestClient, settings: Settings) -> None:
    document = client.get("/openapi.json").json()
    reference = document["paths"]["/jobs/reconstruct"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    properties = document["components"]["schemas"][reference["$ref"].split("/")[-1]]["properties"]
    console = open_console(admin_key(settings), "#/jobs")
    page = console.page
    expect(page.locator("#reconstruct-form")).to_have_attribute("data-defaults", "loaded")
    for name in ("criterion", "k", "alpha", "seed", "samples", "max_new_tokens"):
        expect(page.locator(f"#{name}")).to_have_value(_as_shown(properties[name].get("default")))

    # α takes "auto", one value or one per direction; a field left empty is left to the API's default.
    page.get_by_label("α", exact=True).fill("auto")
    expect(page.locator("#alpha")).to_have_value("auto")
    bodies = page.evaluate("""async () => {
        const { parseAlpha, reconstructBody } = await import("./jobs.js");
        const values = { source: "reference", reference_csv: "x.csv", rows: "0:4", criterion: "", k: "", alpha: "",
                         seed: "", samples: "", max_new_tokens: "" };
        return { alphas: [parseAlpha("auto"), parseAlpha(" AUTO "), parseAlpha("0.5"), parseAlpha("0.1, 0.2")],
                 empty: reconstructBody(values),
                 given: reconstructBody({ ...values, criterion: "delta", k: "8", alpha: "auto", seed: "3" }) };
    }""")
    assert bodies["alphas"] == ["auto", "auto", 0.5, [0.1, 0.2]]
    assert bodies["empty"] == {"reference_csv": "x.csv", "rows": "0:4"}
    assert bodies["given"] == {"reference_csv": "x.csv", "rows": "0:4", "criterion": "delta", "k": 8, "alpha": "auto",
                               "seed": 3}

    # Where the key comes from, in the key panel.
    page.get_by_role("button", name="Change key").click()
    where = page.locator("#key-where")
    expect(where).to_contain_text("printed by eigenshift serve at first start")
    expect(where).to_contain_text("kept in <data-dir>/api-key (default ~/.local/share/eigenshift/api-key)")
    console.check_no_script_errors()
