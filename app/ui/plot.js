// The delta-per-direction plot as SVG: for each damped direction (in selection order), its signed delta
// (mean projection of toxic minus non-toxic states) as a bar, and below it its α as a dot.

import { formatNumber, h, s } from "./dom.js";

const WIDTH = 760;
const LEFT = 64;
const RIGHT = 16;
const DELTA_HEIGHT = 190;
const ALPHA_HEIGHT = 130;
const TOP = 30;
const GAP = 58;
const BOTTOM = 44;

/** Round tick values covering [low, high], about `count` of them. */
export function niceTicks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
  const ticks = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    ticks.push(Math.abs(value) < step * 1e-9 ? 0 : Number(value.toPrecision(12)));
  }
  return ticks;
}

/** A linear map from [d0, d1] onto [r0, r1]. */
function scale(d0, d1, r0, r1) {
  return (value) => r0 + ((value - d0) / (d1 - d0 || 1)) * (r1 - r0);
}

function yAxis(y, ticks, label, top, height) {
  return s("g", { class: "axis y-axis" },
    ticks.map((t) => s("g", {},
      s("line", { x1: LEFT - 5, x2: WIDTH - RIGHT, y1: y(t), y2: y(t), class: "grid" }),
      s("text", { x: LEFT - 8, y: y(t), "text-anchor": "end", "dominant-baseline": "middle" }, formatNumber(t, 2)))),
    s("text", { class: "axis-title", transform: `translate(14 ${top + height / 2}) rotate(-90)`, "text-anchor": "middle" }, label));
}

function xAxis(x, count, top) {
  const step = Math.max(1, Math.ceil(niceTicks(0, count, 8)[1] || 1)); // whole ranks, about 8 labels
  const ticks = [1];
  for (let rank = step; rank <= count; rank += step) if (rank !== 1) ticks.push(rank);
  return s("g", { class: "axis x-axis" },
    ticks.map((rank) => s("text", { x: x(rank - 1), y: top + 16, "text-anchor": "middle" }, String(rank))));
}

function markTitle(d) {
  const parts = [`direction ${d.rank}`, `spectral index ${d.index ?? "?"}`];
  if (d.delta !== null) parts.push(`Δ ${formatNumber(d.delta, 4)}`);
  if (d.score !== null) parts.push(`score ${formatNumber(d.score, 4)}`);
  parts.push(`α ${formatNumber(d.alpha, 4)}`);
  if (d.sigma !== null) parts.push(`σ ${formatNumber(d.sigma, 4)}`);
  return parts.join(", ");
}

/** The SVG plot of `directions`: [{rank, index, alpha, delta, score, sigma}] (delta etc. may be null). */
export function directionPlot(directions) {
  const count = directions.length;
  const hasDelta = directions.some((d) => d.delta !== null);
  const deltaTop = TOP;
  const alphaTop = hasDelta ? deltaTop + DELTA_HEIGHT + GAP : TOP;
  const height = alphaTop + ALPHA_HEIGHT + BOTTOM;
  const band = (WIDTH - LEFT - RIGHT) / Math.max(count, 1);
  const x = (position) => LEFT + band * (position + 0.5);
  const panels = [];

  if (hasDelta) {
    const extent = Math.max(...directions.map((d) => Math.abs(d.delta ?? 0)), 1e-12) * 1.1;
    const y = scale(-extent, extent, deltaTop + DELTA_HEIGHT, deltaTop);
    const width = Math.max(1, band * 0.7);
    panels.push(s("g", { class: "panel delta-panel" },
      s("text", { class: "panel-title", x: LEFT, y: deltaTop - 12 }, "Δ: mean projection, toxic − non-toxic states"),
      yAxis(y, niceTicks(-extent, extent, 4), "Δ", deltaTop, DELTA_HEIGHT),
      s("line", { class: "zero", x1: LEFT, x2: WIDTH - RIGHT, y1: y(0), y2: y(0) }),
      directions.map((d, i) => {
        const top = Math.min(y(0), y(d.delta ?? 0));
        return s("rect", { class: `mark delta-mark ${(d.delta ?? 0) >= 0 ? "positive" : "negative"}`,
          x: x(i) - width / 2, y: top, width, height: Math.max(1, Math.abs(y(d.delta ?? 0) - y(0))),
          "data-rank": d.rank }, s("title", {}, markTitle(d)));
      })));
  }

  const alphas = directions.map((d) => d.alpha);
  const low = Math.min(0, ...alphas);
  const high = Math.max(1, ...alphas);
  const pad = (high - low) * 0.08;
  const ya = scale(low - pad, high + pad, alphaTop + ALPHA_HEIGHT, alphaTop);
  panels.push(s("g", { class: "panel alpha-panel" },
    s("text", { class: "panel-title", x: LEFT, y: alphaTop - 12 }, "α: share of σ kept (1 unchanged, 0 removed)"),
    yAxis(ya, niceTicks(low, high, 4), "α", alphaTop, ALPHA_HEIGHT),
    s("line", { class: "reference", x1: LEFT, x2: WIDTH - RIGHT, y1: ya(1), y2: ya(1) }),
    s("line", { class: "reference", x1: LEFT, x2: WIDTH - RIGHT, y1: ya(0), y2: ya(0) }),
    directions.map((d, i) => s("circle", { class: "mark alpha-mark", cx: x(i), cy: ya(d.alpha), r: Math.max(1.5, Math.min(4, band / 2.5)),
      "data-rank": d.rank }, s("title", {}, markTitle(d)))),
    xAxis(x, count, alphaTop + ALPHA_HEIGHT),
    s("text", { class: "axis-title", x: LEFT + (WIDTH - LEFT - RIGHT) / 2, y: alphaTop + ALPHA_HEIGHT + 36, "text-anchor": "middle" },
      "direction, in order of selection (1 = highest criterion score)")));

  const description = hasDelta
    ? `${count} damped directions: signed delta as bars, α as dots. The table below lists the values.`
    : `${count} damped directions: α as dots (this intervention's per-direction delta is not available).`;
  return s("svg", { class: "direction-plot", viewBox: `0 0 ${WIDTH} ${height}`, role: "img", "aria-labelledby": "plot-title plot-desc",
    "data-directions": count },
  s("title", { id: "plot-title" }, "Damped directions of the output layer"),
  s("desc", { id: "plot-desc" }, description), panels);
}

/** The same values as a table, for reading and for screen readers. */
export function directionTable(directions) {
  const cell = (value) => h("td", { class: "number" }, value === null || value === undefined ? "–" : formatNumber(value, 4));
  return h("details", { class: "direction-values" },
    h("summary", {}, `Values of the ${directions.length} directions`),
    h("div", { class: "table-scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Rank", "Spectral index", "Δ", "Score", "α", "σ"].map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, directions.map((d) => h("tr", {},
        h("td", { class: "number" }, String(d.rank)), h("td", { class: "number" }, d.index === null ? "–" : String(d.index)), cell(d.delta), cell(d.score), cell(d.alpha), cell(d.sigma)))))));
}
