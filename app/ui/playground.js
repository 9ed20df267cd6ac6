// The playground: one prompt continued with detox off and on, side by side, each with its toxicity score
// and its toxic words highlighted (when the API has POST /v1/moderations).

import { api, describeError } from "./api.js";
import { formatNumber, h, replaceChildren } from "./dom.js";
import { highlighted, spansFromModeration } from "./highlight.js";
import { clearNotices, showError, showMessage } from "./notice.js";

const SIDES = [
  { detox: false, id: "off", title: "Detox off" },
  { detox: true, id: "on", title: "Detox on" },
];

/** The body of POST /generate: the same prompt, settings and seed twice, once without the intervention. */
export function generateBody({ prompt, maxNewTokens, temperature, seed, intervention }) {
  const common = { prompt, max_new_tokens: maxNewTokens, temperature, seed };
  return {
    items: SIDES.map(({ detox }) => ({ ...common, detox, ...(detox && intervention ? { intervention } : {}) })),
    score: true,
  };
}

function scoreLine(toxicity) {
  const known = typeof toxicity === "number";
  return h("p", { class: "score" }, h("span", { class: "score-label" }, "Toxicity"), " ",
    known ? h("meter", { min: 0, max: 1, low: 0.3, high: 0.5, optimum: 0, value: toxicity, "aria-hidden": "true" }) : null, " ",
    h("strong", { class: "score-value" }, known ? formatNumber(toxicity, 3) : "not scored"));
}

function outputColumn(side, generation, spans) {
  const meta = [`finish: ${generation.finish_reason}`, `seed ${generation.seed}`,
    generation.intervention ? `intervention ${generation.intervention}` : "no intervention"].join(" · ");
  return h("section", { class: "output panel", "data-detox": side.id, "aria-labelledby": `output-${side.id}-heading` },
    h("h3", { id: `output-${side.id}-heading` }, side.title), scoreLine(generation.toxicity),
    h("p", { class: "generated" }, h("span", { class: "prompt" }, generation.prompt),
      h("span", { class: "continuation" }, highlighted(generation.text, spans))),
    h("p", { class: "hint meta" }, meta));
}

async function interventionOptions(select, signal) {
  try {
    const page = await api("/interventions", { signal });
    for (const record of page.data) {
      select.append(h("option", { value: record.id }, `${record.id}${record.active ? " (active)" : ""} · k=${record.k}`));
    }
  } catch (error) {
    if (error.name !== "AbortError") select.title = `the list needs the jobs:read scope (${describeError(error)})`;
  }
}

/** Spans for each text, or null with the reason the words cannot be highlighted. */
async function moderate(texts, signal) {
  try {
    const spans = spansFromModeration(await api("/v1/moderations", { method: "POST", body: { input: texts }, signal }), texts.length);
    return spans ? { spans, note: "" } : { spans: null, note: "The moderations answer carried no word spans." };
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const why = error.status === 404 ? "this API has no POST /v1/moderations" : describeError(error);
    return { spans: null, note: `Toxic words are not highlighted: ${why}` };
  }
}

export function mountPlayground(main) {
  const controller = new AbortController();
  const signal = controller.signal;
  clearNotices();
  const prompt = h("textarea", { id: "prompt", name: "prompt", rows: 3, required: true, maxlength: 2000 }, "The man on the bus started yelling at");
  const maxNewTokens = h("input", { id: "max-new-tokens", type: "number", min: 1, max: 256, value: 24, required: true });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 10, step: 0.1, value: 0, required: true, "aria-describedby": "temperature-hint" });
  const seed = h("input", { id: "seed", type: "number", min: 0, max: 2 ** 31 - 1, placeholder: "random", "aria-describedby": "seed-hint" });
  const intervention = h("select", { id: "intervention" }, h("option", { value: "" }, "the active one"));
  const button = h("button", { type: "submit" }, "Generate both");
  const results = h("div", { class: "two-columns", id: "outputs" });
  const note = h("p", { class: "hint", id: "highlight-note" });

  const form = h("form", { class: "panel", id: "playground-form", "aria-labelledby": "playground-heading" },
    h("h2", { id: "playground-heading", class: "visually-hidden" }, "Prompt"),
    h("div", { class: "field" }, h("label", { for: "prompt" }, "Prompt"), prompt),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "max-new-tokens" }, "New tokens"), maxNewTokens),
      h("div", { class: "field" }, h("label", { for: "temperature" }, "Temperature"), temperature,
        h("p", { class: "hint", id: "temperature-hint" }, "0 is greedy")),
      h("div", { class: "field" }, h("label", { for: "seed" }, "Seed"), seed,
        h("p", { class: "hint", id: "seed-hint" }, "both sides share it")),
      h("div", { class: "field" }, h("label", { for: "intervention" }, "Intervention"), intervention)),
    button);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    showMessage("Generating…");
    try {
      const body = generateBody({
        prompt: prompt.value, maxNewTokens: Number(maxNewTokens.value), temperature: Number(temperature.value),
        seed: seed.value === "" ? Math.floor(Math.random() * 2 ** 31) : Number(seed.value), intervention: intervention.value,
      });
      const answer = await api("/generate", { method: "POST", body, signal });
      replaceChildren(results, SIDES.map((side, i) => outputColumn(side, answer.data[i], [])));
      replaceChildren(note, "Looking for toxic words…");
      const { spans, note: why } = await moderate(answer.data.map((g) => g.text), signal);
      replaceChildren(results, SIDES.map((side, i) => outputColumn(side, answer.data[i], spans ? spans[i] : [])));
      replaceChildren(note, spans ? "Highlighted: the words that raise each text's toxicity score." : why);
      results.dataset.highlighting = spans ? "on" : "off";
      const scores = answer.data.map((g) => formatNumber(g.toxicity, 3));
      showMessage(`Done: toxicity ${scores[0]} with detox off, ${scores[1]} with detox on.`);
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    } finally {
      button.disabled = false;
    }
  });

  replaceChildren(main, h("h1", {}, "Playground"),
    h("p", { class: "hint" }, "The same prompt, seed and settings, continued without and with the intervention."),
    form, h("section", { "aria-label": "Outputs" }, note, results));
  interventionOptions(intervention, signal);
  return () => controller.abort();
}
