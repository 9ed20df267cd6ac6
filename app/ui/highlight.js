// Toxic words of a text as <mark>s, from the spans POST /v1/moderations returns. Offsets count Unicode code
// points (Python's str indices), not UTF-16 units, so the text is split with Array.from.

import { formatNumber, h } from "./dom.js";

function validSpan(span, length) {
  return span && Number.isInteger(span.begin) && Number.isInteger(span.end) && span.begin >= 0 && span.end <= length
    && span.begin < span.end && (typeof span.score !== "number" || span.score > 0);
}

/** The text cut into [{text, span}] pieces in order; span is null outside a highlight. Overlapping or
 * malformed spans are dropped, so the pieces always join back into `text`. */
export function segments(text, spans) {
  const chars = Array.from(text);
  const chosen = (Array.isArray(spans) ? spans : []).filter((span) => validSpan(span, chars.length))
    .sort((a, b) => a.begin - b.begin);
  const pieces = [];
  let at = 0;
  for (const span of chosen) {
    if (span.begin < at) continue;
    if (span.begin > at) pieces.push({ text: chars.slice(at, span.begin).join(""), span: null });
    pieces.push({ text: chars.slice(span.begin, span.end).join(""), span });
    at = span.end;
  }
  if (at < chars.length || pieces.length === 0) pieces.push({ text: chars.slice(at).join(""), span: null });
  return pieces;
}

/** Text nodes and <mark>s for `text`; every piece goes in as text, never as HTML. */
export function highlighted(text, spans) {
  return segments(text, spans).map((piece) => (piece.span
    ? h("mark", { class: "toxic", title: typeof piece.span.score === "number" ? `toxicity contribution ${formatNumber(piece.span.score, 3)}` : null }, piece.text)
    : piece.text));
}

/** The spans of each of `count` texts from a moderations answer, or null when the answer lacks them. */
export function spansFromModeration(body, count) {
  const results = body && Array.isArray(body.results) ? body.results : null;
  if (!results || results.length !== count) return null;
  return results.map((result) => {
    const spans = result && result.eigenshift && result.eigenshift.spans;
    return Array.isArray(spans) ? spans : [];
  });
}
