// Interventions: the list, and one intervention's metadata, its damped directions (plot) and its report.

import { api, apiBytes, download } from "./api.js";
import { formatNumber, formatTime, h, replaceChildren } from "./dom.js";
import { clearNotices, showError, showMessage } from "./notice.js";
import { directionPlot, directionTable } from "./plot.js";
import { parseSafetensors } from "./safetensors.js";

const TENSORS = ["indices", "alphas", "delta", "scores", "singular_values"];
const METRIC_LABELS = {
  toxicity_rate: "Toxicity rate (share of toxic continuations)",
  at_least_once: "Prompts toxic at least once",
  expected_max_toxicity: "Expected maximum toxicity",
  perplexity: "Perplexity (WikiText)",
};

function activeBadge(active) {
  return active ? h("span", { class: "badge state-succeeded" }, "active") : null;
}

export function mountInterventionList(main) {
  const controller = new AbortController();
  clearNotices();
  const body = h("tbody");
  replaceChildren(main, h("h1", {}, "Interventions"),
    h("p", { class: "hint" }, "Each one damps k directions of a model's output layer. The active one is the default for detoxified generation."),
    h("div", { class: "table-scroll" }, h("table", { id: "interventions-table" },
      h("caption", { class: "visually-hidden" }, "Interventions, oldest first"),
      h("thead", {}, h("tr", {}, ["Intervention", "Model", "k", "Criterion", "Toxicity reduction", "Created"].map((n) => h("th", { scope: "col" }, n)))),
      body)));
  api("/interventions", { signal: controller.signal }).then((page) => {
    if (!page.data.length) replaceChildren(body, h("tr", {}, h("td", { colspan: 6 }, "No interventions yet.")));
    else {
      replaceChildren(body, page.data.map((record) => h("tr", { "data-intervention-id": record.id },
        h("td", {}, h("a", { href: `#/interventions/${encodeURIComponent(record.id)}` }, record.id), " ", activeBadge(record.active)),
        h("td", {}, record.model), h("td", { class: "number" }, String(record.k)), h("td", {}, record.criterion || "–"),
        h("td", { class: "number" }, withInterval(record.metrics && record.metrics.toxicity_reduction, " %")),
        h("td", {}, formatTime(record.created_at)))));
    }
  }).catch((error) => { if (error.name !== "AbortError") showError(error); });
  return () => controller.abort();
}

/** The directions, one per damped direction in selection order, from the tensors file when there is one. */
export function directionsFromTensors(tensors) {
  const get = (name) => (tensors[name] ? tensors[name].values : null);
  const indices = get("indices");
  const alphas = get("alphas");
  if (!indices || !alphas || indices.length !== alphas.length) throw new Error("the tensors file lacks indices or alphas");
  const delta = get("delta");
  const scores = get("scores");
  const sigma = get("singular_values");
  return indices.map((index, i) => ({
    rank: i + 1, index, alpha: alphas[i], delta: delta ? delta[index] : null, score: scores ? scores[index] : null,
    sigma: sigma ? sigma[i] : null,
  }));
}

/** Only α is known (the record's): the per-direction delta lives in the tensors file. */
export function directionsFromAlphas(alphas) {
  return alphas.map((alpha, i) => ({ rank: i + 1, index: null, alpha, delta: null, score: null, sigma: null }));
}

async function loadDirections(record, job, signal) {
  const artifact = job && job.artifacts.find((a) => a.name.endsWith("intervention.safetensors"));
  if (!artifact) return { directions: directionsFromAlphas(record.alpha), note: "Only α is shown: the API serves the per-direction delta only from the tensors of the job that built an intervention." };
  const tensors = parseSafetensors(await apiBytes(artifact.href, { signal }), TENSORS);
  return { directions: directionsFromTensors(tensors), note: `From ${artifact.name} of job ${job.id}.` };
}

/** A figure as text: a number, or {value, low, high} as "value (CI low–high)". */
function intervalParts(figure, unit = "") {
  if (typeof figure === "number") return { value: `${formatNumber(figure, 4)}${unit}`, interval: "" };
  if (!figure || typeof figure.value !== "number") return { value: "–", interval: "" };
  const interval = typeof figure.low === "number" && typeof figure.high === "number"
    ? ` (CI ${formatNumber(figure.low, 3)}–${formatNumber(figure.high, 3)})` : "";
  return { value: `${formatNumber(figure.value, 4)}${unit}`, interval };
}

function withInterval(figure, unit = "") {
  const { value, interval } = intervalParts(figure, unit);
  return value + interval;
}

function figureCell(figure, unit = "", colspan = null) {
  const { value, interval } = intervalParts(figure, unit);
  return h("td", { class: "number", colspan }, value, interval ? h("span", { class: "ci" }, interval) : null);
}

/** Before/after of a report (or the summary kept with the intervention), with confidence intervals. */
export function reportTable(report) {
  const before = report.baseline || {};
  const after = report.intervention || {};
  const keys = [...new Set([...Object.keys(METRIC_LABELS), ...Object.keys(before), ...Object.keys(after)])]
    .filter((key) => key in before || key in after);
  return h("table", { id: "report-table" },
    h("caption", {}, "Held-out evaluation, before and after the intervention"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"), h("th", { scope: "col" }, "Before"), h("th", { scope: "col" }, "After"))),
    h("tbody", {},
      keys.map((key) => h("tr", { "data-metric": key }, h("th", { scope: "row" }, METRIC_LABELS[key] || key),
        figureCell(before[key]), figureCell(after[key]))),
      report.toxicity_reduction !== undefined ? h("tr", { "data-metric": "toxicity_reduction" },
        h("th", { scope: "row" }, "Toxicity reduction"), figureCell(report.toxicity_reduction, " %", 2)) : null,
      typeof report.tph === "number" ? h("tr", { "data-metric": "tph" },
        h("th", { scope: "row" }, "TPH: harmonic mean of the reduction and 100·perplexity ratio"), h("td", { class: "number", colspan: 2 }, formatNumber(report.tph, 4))) : null));
}

function metadataList(record) {
  const p = record.provenance || {};
  const counts = p.state_counts ? `${p.state_counts.toxic} toxic, ${p.state_counts.nontoxic} non-toxic` : null;
  const entries = [
    ["Model", record.model], ["Directions (k)", String(record.k)], ["Criterion", record.criterion || "–"],
    ["α", record.alpha.length && record.alpha.every((a) => a === record.alpha[0]) ? formatNumber(record.alpha[0], 4) : `per direction, ${formatNumber(Math.min(...record.alpha), 3)} to ${formatNumber(Math.max(...record.alpha), 3)}`],
    ["States", counts], ["Scorer", p.scorer], ["Created", formatTime(record.created_at)],
    ["lm_head sha256", p.lm_head_sha256 ? `${p.lm_head_sha256.slice(0, 16)}…` : null],
  ];
  return h("dl", { class: "metadata" }, entries.filter(([, value]) => value !== null && value !== undefined)
    .map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
  record.job_id ? [h("dt", {}, "Built by job"), h("dd", {}, h("a", { href: "#/jobs" }, record.job_id))] : null);
}

export function mountInterventionDetail(main, [interventionId]) {
  const controller = new AbortController();
  const signal = controller.signal;
  clearNotices();
  const heading = h("h1", {}, "Intervention ", h("code", {}, interventionId));
  const status = h("p", { class: "active-state" });
  const activate = h("button", { type: "button", id: "activate" }, "Activate");
  const plotArea = h("section", { class: "panel", id: "directions", "aria-labelledby": "directions-heading" },
    h("h2", { id: "directions-heading" }, "Damped directions"), h("p", { class: "hint" }, "Loading…"));
  const reportArea = h("section", { class: "panel", id: "report", "aria-labelledby": "report-heading" },
    h("h2", { id: "report-heading" }, "Toxicity and perplexity"), h("p", { class: "hint" }, "Loading…"));
  const meta = h("section", { class: "panel", "aria-labelledby": "meta-heading" }, h("h2", { id: "meta-heading" }, "About"));
  replaceChildren(main, h("p", {}, h("a", { href: "#/interventions" }, "← All interventions")), heading,
    h("div", { class: "row centered" }, status, activate), h("div", { class: "two-columns" }, meta, reportArea), plotArea);

  const showActive = (record) => {
    replaceChildren(status, record.active ? [activeBadge(true), ` the default for detoxified ${record.model} generation`]
      : "Not active: detoxified generation uses it only when a request names it.");
    activate.hidden = record.active;
  };
  activate.addEventListener("click", async () => {
    activate.disabled = true;
    try {
      showActive(await api(`/interventions/${encodeURIComponent(interventionId)}/activate`, { method: "POST", signal }));
      showMessage(`${interventionId} is now the active intervention.`);
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    } finally {
      activate.disabled = false;
    }
  });

  (async () => {
    const record = await api(`/interventions/${encodeURIComponent(interventionId)}`, { signal });
    showActive(record);
    replaceChildren(meta, h("h2", { id: "meta-heading" }, "About"), metadataList(record));
    const job = record.job_id ? await api(`/jobs/${encodeURIComponent(record.job_id)}`, { signal }).catch((error) => {
      if (error.status === 404) return null; // a job record may expire before its intervention
      throw error;
    }) : null;
    await Promise.all([renderReport(record, job), renderDirections(record, job)]);
  })().catch((error) => { if (error.name !== "AbortError") showError(error); });

  async function renderDirections(record, job) {
    try {
      const { directions, note } = await loadDirections(record, job, signal);
      replaceChildren(plotArea, h("h2", { id: "directions-heading" }, "Damped directions"),
        h("p", { class: "hint" }, note), h("figure", {}, directionPlot(directions),
          h("figcaption", {}, "Hover a mark for its values. Δ > 0: toxic states lie further along the direction.")),
        directionTable(directions));
    } catch (error) {
      if (error.name === "AbortError") return;
      replaceChildren(plotArea, h("h2", { id: "directions-heading" }, "Damped directions"),
        h("p", { class: "hint" }, `The directions could not be read: ${error.message}`),
        directionPlot(directionsFromAlphas(record.alpha)));
    }
  }

  async function renderReport(record, job) {
    const reportArtifact = job && job.artifacts.find((a) => a.name.endsWith("report.json"));
    const imageArtifact = job && job.artifacts.find((a) => a.name.endsWith("report.png"));
    let report = record.metrics;
    if (!report && reportArtifact) report = await api(reportArtifact.href, { signal });
    const parts = [h("h2", { id: "report-heading" }, "Toxicity and perplexity")];
    if (!report || (!report.baseline && !report.intervention)) {
      parts.push(h("p", {}, "No evaluation of this intervention yet. ",
        h("a", { href: `#/jobs?evaluate=${encodeURIComponent(record.id)}` }, "Queue an evaluate job"), "."));
    } else {
      parts.push(reportTable(report));
    }
    if (reportArtifact) {
      parts.push(h("p", {}, h("button", { type: "button", class: "link",
        onclick: () => download(reportArtifact.href, `${record.id}-report.json`).catch(showError) }, "Download the full report (JSON)")));
    }
    const image = imageArtifact ? await apiBytes(imageArtifact.href, { signal }).catch(() => null) : null;
    if (image) { // the figure only repeats the table: without it the page is still whole
      const url = URL.createObjectURL(new Blob([image], { type: "image/png" }));
      parts.push(h("img", { src: url, alt: "The report's figure: toxicity before and after the intervention", class: "report-image" }));
    }
    replaceChildren(reportArea, parts);
  }

  return () => controller.abort();
}
