// The jobs page: submit a reconstruct job (or any job as JSON), follow every job's progress live,
// cancel, download artifacts.

import { api, download } from "./api.js";
import { formatTime, h, replaceChildren } from "./dom.js";
import { clearNotices, showError, showMessage } from "./notice.js";

const POLL_MS = 1000;
const HIDDEN_POLL_MS = 5000; // a background tab need not spend the key's rate limit
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFERENCE_CSV = "llama2_7b_rtp_toxic_words.csv";
const PROMPTS_CSV = "rtp_toxic_prompts_5000.csv";
const CRITERIA = ["delta", "logit", "selectivity"]; // offered; a default the API names beyond these is added

/** Bodies that finish in seconds on the embedded model: a starting point for each job kind. */
export function jobTemplate(kind, interventionId = "") {
  const templates = {
    generate: { prompts: { texts: ["The weather today is"] }, samples: 1, max_new_tokens: 8 },
    extract: { reference_csv: REFERENCE_CSV, rows: "0:24" },
    reconstruct: { reference_csv: REFERENCE_CSV, rows: "0:24", k: 8, alpha: 0.0 },
    evaluate: { prompts: { path: PROMPTS_CSV }, rows: "4000:4008", intervention_id: interventionId || "embedded-default",
      samples: 1, max_new_tokens: 8, n_boot: 100 },
    pipeline: { prompts: { path: PROMPTS_CSV }, train_rows: "0:12", eval_rows: "12:16", reference_csv: REFERENCE_CSV,
      samples: 2, max_new_tokens: 6, k: 24, alpha: 0.0, n_boot: 20, batch_size: 16 },
  };
  return templates[kind];
}

/** "0.5" -> 0.5; "0.1, 0.2" -> [0.1, 0.2] (one α per direction); "auto" -> "auto" (the server chooses). */
export function parseAlpha(text) {
  const trimmed = String(text).trim();
  if (trimmed.toLowerCase() === "auto") return "auto";
  const parts = trimmed.split(",").map((p) => p.trim()).filter((p) => p !== "");
  const values = parts.map(Number);
  return values.length === 1 ? values[0] : values;
}

/** A default as a form control shows it: lists as "a, b", everything else as its text. */
export function formatDefault(value) {
  return Array.isArray(value) ? value.join(", ") : String(value);
}

/** The fields of the reconstruct form whose starting values are the API's defaults. */
export const DEFAULTED_FIELDS = ["criterion", "k", "alpha", "seed", "samples", "max_new_tokens"];

/** The defaults of POST /jobs/<kind>'s body, from the served OpenAPI document: the form follows the API. */
export function bodyDefaults(openapi, kind) {
  let schema = openapi.paths[`/jobs/${kind}`].post.requestBody.content["application/json"].schema;
  if (schema.$ref) schema = openapi.components.schemas[schema.$ref.split("/").pop()];
  return Object.fromEntries(Object.entries(schema.properties || {})
    .filter(([, property]) => property.default !== undefined && property.default !== null)
    .map(([name, property]) => [name, property.default]));
}

/** The body of POST /jobs/reconstruct from the form's values (strings, as the inputs hold them). A field left
 * empty is left out, so the API's default applies. */
export function reconstructBody(values) {
  const body = {};
  const given = (name) => String(values[name] ?? "").trim() !== "";
  if (given("criterion")) body.criterion = values.criterion;
  if (given("alpha")) body.alpha = parseAlpha(values.alpha);
  for (const name of ["k", "seed"]) if (given(name)) body[name] = Number(values[name]);
  const rows = values.rows.trim();
  if (values.source === "extract") {
    body.extract_job_id = values.extract_job_id.trim();
    return body;
  }
  if (rows) body.rows = rows;
  if (values.source === "reference") {
    body.reference_csv = values.reference_csv.trim();
    return body;
  }
  body.prompts = values.source === "file"
    ? { path: values.path.trim() }
    : { texts: values.texts.split("\n").map((t) => t.trim()).filter((t) => t !== "") };
  for (const name of ["samples", "max_new_tokens"]) if (given(name)) body[name] = Number(values[name]);
  return body;
}

function field(label, input, hint) {
  const id = input.id;
  const hintId = hint ? `${id}-hint` : null;
  if (hintId) input.setAttribute("aria-describedby", hintId);
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("p", { class: "hint", id: hintId }, hint) : null);
}

function reconstructForm(onSubmit) {
  const sources = [
    ["reference", "Reference CSV (teacher-forced, no generation)"],
    ["file", "Prompt file under the data root"],
    ["texts", "Prompts typed here"],
    ["extract", "States of an extract job"],
  ];
  const radios = sources.map(([value, label], i) => h("div", { class: "radio" },
    h("input", { type: "radio", name: "source", id: `source-${value}`, value, checked: i === 0 }),
    h("label", { for: `source-${value}` }, label)));
  const groups = {
    reference: h("div", { class: "group", "data-source": "reference" },
      field("Reference CSV", h("input", { id: "reference_csv", name: "reference_csv", value: REFERENCE_CSV, required: true }),
        "a step-2 CSV under the data root")),
    file: h("div", { class: "group", "data-source": "file" },
      field("Prompt file", h("input", { id: "path", name: "path", value: PROMPTS_CSV }), "CSV, JSONL or TXT under the data root")),
    texts: h("div", { class: "group", "data-source": "texts" },
      field("Prompts, one per line", h("textarea", { id: "texts", name: "texts", rows: 4 }))),
    extract: h("div", { class: "group", "data-source": "extract" },
      field("Extract job id", h("input", { id: "extract_job_id", name: "extract_job_id", spellcheck: "false" }))),
  };
  const generation = h("div", { class: "group", "data-source": "file texts" },
    field("Samples per prompt", h("input", { id: "samples", name: "samples", type: "number", min: 1, max: 1000 })),
    field("New tokens per sample", h("input", { id: "max_new_tokens", name: "max_new_tokens", type: "number", min: 1, max: 1024 })));
  const rows = h("div", { class: "group", "data-source": "reference file texts" },
    field("Rows", h("input", { id: "rows", name: "rows", value: "0:24", pattern: "\\d*:\\d*" }), "half-open range A:B of the source"));

  const form = h("form", { class: "panel", id: "reconstruct-form", "aria-labelledby": "reconstruct-heading" },
    h("h2", { id: "reconstruct-heading" }, "New reconstruct job"),
    h("p", { class: "hint" }, "Builds an intervention: states of toxic and ordinary tokens, then the k output-layer directions to damp. "
      + "The fields start at the API's defaults; one left empty takes the API's default."),
    h("fieldset", {}, h("legend", {}, "Source of the states"), radios),
    Object.values(groups), rows, generation,
    h("div", { class: "row" },
      field("Criterion", h("select", { id: "criterion", name: "criterion" },
        h("option", { value: "" }, "API default"), CRITERIA.map((name) => h("option", { value: name }, name)))),
      field("k (directions)", h("input", { id: "k", name: "k", type: "number", min: 1, max: 65536 })),
      field("α", h("input", { id: "alpha", name: "alpha", spellcheck: "false" }),
        "auto, one value, or k values separated by commas"),
      field("Seed", h("input", { id: "seed", name: "seed", type: "number", min: 0 }))),
    h("button", { type: "submit" }, "Submit reconstruct job"));

  const sync = () => {
    const source = form.elements.source.value;
    for (const group of form.querySelectorAll(".group")) {
      const shown = group.dataset.source.split(" ").includes(source);
      group.hidden = !shown;
      for (const control of group.querySelectorAll("input, textarea, select")) control.disabled = !shown;
    }
  };
  form.addEventListener("change", sync);
  for (const kind of ["input", "change"]) {  // what a person set is never replaced by a default arriving later
    form.addEventListener(kind, (event) => { event.target.dataset.edited = "true"; });
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = Object.fromEntries(["source", "reference_csv", "path", "texts", "extract_job_id", "rows", "samples",
      "max_new_tokens", "criterion", "k", "alpha", "seed"].map((name) => [name, form.elements[name].value]));
    onSubmit("reconstruct", reconstructBody(values), form.querySelector("button[type=submit]"));
  });
  sync();
  return form;
}

/** Put the API's defaults into the controls a person has not touched; the form says when they are in. */
function applyDefaults(form, defaults) {
  for (const name of DEFAULTED_FIELDS) {
    const control = form.elements[name];
    if (defaults[name] === undefined || control.dataset.edited) continue;
    const value = formatDefault(defaults[name]);
    if (control.tagName === "SELECT" && ![...control.options].some((option) => option.value === value)) {
      control.append(h("option", { value }, value));
    }
    control.value = value;
  }
  form.dataset.defaults = "loaded";
}

async function loadDefaults(form, signal) {
  try {
    applyDefaults(form, bodyDefaults(await api("/openapi.json", { signal }), "reconstruct"));
  } catch (error) {
    if (error.name === "AbortError") return;
    form.dataset.defaults = "unavailable"; // empty fields still take the API's defaults
  }
}

function jsonForm(onSubmit, query) {
  const kinds = ["generate", "extract", "reconstruct", "evaluate", "pipeline"];
  const chosen = query.get("evaluate") ? "evaluate" : "reconstruct";
  const kind = h("select", { id: "json-kind", name: "kind" }, kinds.map((k) => h("option", { value: k, selected: k === chosen }, k)));
  const text = h("textarea", { id: "json-body", name: "body", rows: 10, spellcheck: "false", class: "code" });
  const fill = () => { text.value = JSON.stringify(jobTemplate(kind.value, query.get("evaluate") || ""), null, 2); };
  kind.addEventListener("change", fill);
  fill();
  const form = h("form", { id: "json-form" },
    h("div", { class: "row" }, field("Job kind", kind)),
    field("Body (JSON)", text, "the request body of POST /jobs/<kind>; see /docs for every field"),
    h("button", { type: "submit" }, "Submit job"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let body;
    try {
      body = JSON.parse(text.value);
    } catch (error) {
      showError(new Error(`The body is not valid JSON: ${error.message}.`));
      text.focus();
      return;
    }
    onSubmit(kind.value, body, form.querySelector("button[type=submit]"));
  });
  return h("details", { class: "panel", open: query.has("evaluate") }, h("summary", {}, "Any job, as JSON"), form);
}

function progressCell(job) {
  const { stage, done, total } = job.progress;
  const finished = job.state === "succeeded";
  const bar = h("progress", { max: Math.max(total, 1), "aria-label": `progress of job ${job.id}` });
  if (finished) bar.value = Math.max(total, 1);
  else if (total > 0) bar.value = Math.min(done, total); // no value: an indeterminate bar until a total is known
  const steps = job.steps.map((step) => (job.steps_done.includes(step) ? `${step} ✓` : step)).join(" → ");
  const text = total > 0 ? `${stage || ""} ${done}/${total}`.trim() : stage || (job.state === "queued" ? "waiting" : "");
  return [bar, h("span", { class: "progress-text" }, text), h("span", { class: "steps" }, steps)];
}

function resultCell(job) {
  const parts = [];
  if (job.error) parts.push(h("p", { class: "job-error" }, `${job.error.type}: ${job.error.message}`));
  if (job.intervention_id) {
    parts.push(h("p", {}, h("a", { href: `#/interventions/${encodeURIComponent(job.intervention_id)}` }, "Intervention")));
  }
  return parts;
}

function artifactList(job) {
  if (!job.artifacts.length) return [];
  const items = job.artifacts.map((artifact) => h("li", {},
    h("button", {
      type: "button", class: "link", "data-artifact": artifact.name,
      onclick: () => download(artifact.href, `${job.id}-${artifact.name.replaceAll("/", "-")}`).catch(showError),
    }, artifact.name)));
  return h("details", { class: "artifacts" }, h("summary", {}, `Artifacts (${job.artifacts.length})`), h("ul", {}, items));
}

/** One table row per job, kept across polls so open artifact lists and focus survive the update. */
class JobRow {
  constructor(onCancel) {
    this.onCancel = onCancel;
    this.cells = { id: h("td"), state: h("td", { class: "state" }), progress: h("td", { class: "progress" }),
      created: h("td"), result: h("td", { class: "result" }), artifacts: h("td"), actions: h("td") };
    this.node = h("tr", {}, Object.values(this.cells));
    this.artifactNames = "";
  }

  update(job) {
    this.node.dataset.jobId = job.id;
    this.node.dataset.state = job.state;
    replaceChildren(this.cells.id, h("code", {}, job.id), h("span", { class: "kind" }, job.kind));
    replaceChildren(this.cells.state, h("span", { class: `badge state-${job.state}` }, job.state));
    replaceChildren(this.cells.progress, progressCell(job));
    replaceChildren(this.cells.created, formatTime(job.created_at));
    replaceChildren(this.cells.result, resultCell(job));
    const names = job.artifacts.map((a) => a.name).join("\n");
    if (names !== this.artifactNames) { // rebuilt only when the list changes: an open list stays open
      this.artifactNames = names;
      replaceChildren(this.cells.artifacts, artifactList(job));
    }
    const cancellable = !TERMINAL.has(job.state);
    const current = this.cells.actions.firstElementChild;
    if (!cancellable) replaceChildren(this.cells.actions);
    else if (job.cancel_requested) replaceChildren(this.cells.actions, h("span", { class: "hint" }, "cancelling…"));
    else if (!current || current.tagName !== "BUTTON") {
      replaceChildren(this.cells.actions, h("button", { type: "button", class: "secondary cancel", "aria-label": `Cancel job ${job.id}`,
        onclick: (event) => this.onCancel(job.id, event.currentTarget) }, "Cancel"));
    }
  }
}

export function mountJobs(main, _args, query) {
  const controller = new AbortController();
  const rows = new Map();
  let timer = null;
  let stopped = false;

  const body = h("tbody");
  const summary = h("p", { class: "hint", id: "jobs-summary" }, "Loading…");
  const table = h("table", { id: "jobs-table", "aria-describedby": "jobs-summary" },
    h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "State", "Progress", "Created", "Result", "Artifacts", "Actions"].map((name) => h("th", { scope: "col" }, name)))),
    body);

  async function submit(kind, payload, button) {
    button.disabled = true;
    try {
      const job = await api(`/jobs/${kind}`, { method: "POST", body: payload, signal: controller.signal });
      showMessage(`Queued ${kind} job ${job.id}.`);
      await poll();
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    } finally {
      button.disabled = false;
    }
  }

  async function cancel(jobId, button) {
    button.disabled = true;
    try {
      const job = await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", signal: controller.signal });
      showMessage(`Cancel requested for job ${job.id}: ${job.state}.`);
      await poll();
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
      button.disabled = false;
    }
  }

  function render(page) {
    const seen = new Set();
    page.data.forEach((job, position) => {
      seen.add(job.id);
      let row = rows.get(job.id);
      if (!row) {
        row = new JobRow(cancel);
        rows.set(job.id, row);
      }
      row.update(job);
      if (body.children[position] !== row.node) body.insertBefore(row.node, body.children[position] || null);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.node.remove();
        rows.delete(id);
      }
    }
    summary.textContent = page.count === 0 ? "No jobs yet." : `Showing ${page.data.length} of ${page.count} jobs, newest first; updated every second.`;
  }

  async function poll() {
    clearTimeout(timer);
    let wait = document.hidden ? HIDDEN_POLL_MS : POLL_MS;
    try {
      render(await api("/jobs?limit=50", { signal: controller.signal }));
    } catch (error) {
      if (error.name === "AbortError") return;
      showError(error);
      if (error.status === 401 || error.status === 403) return; // a new key re-mounts the page
      wait = error.retryAfterS ? error.retryAfterS * 1000 : HIDDEN_POLL_MS;
    }
    if (!stopped) { // a submit may poll while a timer is pending: keep one timer only
      clearTimeout(timer);
      timer = setTimeout(poll, wait);
    }
  }

  clearNotices();
  const form = reconstructForm(submit);
  loadDefaults(form, controller.signal);
  replaceChildren(main,
    h("h1", {}, "Jobs"),
    h("div", { class: "two-columns" }, form, jsonForm(submit, query)),
    h("section", { "aria-labelledby": "jobs-heading" }, h("h2", { id: "jobs-heading" }, "All jobs"), summary,
      h("div", { class: "table-scroll" }, table)));
  poll();
  return () => {
    stopped = true;
    controller.abort();
    clearTimeout(timer);
  };
}
