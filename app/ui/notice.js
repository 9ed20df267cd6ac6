// The two message lines under the header: errors (role=alert) and progress notes (role=status).

import { describeError } from "./api.js";

export const UNAUTHORIZED_EVENT = "console:unauthorized";

function setText(id, text) {
  const node = document.getElementById(id);
  if (node.textContent !== text) node.textContent = text; // unchanged text is not announced again
  node.hidden = text === "";
}

/** Show what went wrong; a refused key (401) also asks for another one. */
export function showError(error) {
  setText("error", describeError(error));
  setText("status", "");
  if (error && error.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT));
}

export function showMessage(text) {
  setText("error", "");
  setText("status", text);
}

export function clearNotices() {
  setText("error", "");
  setText("status", "");
}
