// Entry point: the API key panel and hash routing between the pages (#/jobs, #/interventions[/<id>],
// #/playground). Each page's mount function returns a cleanup that stops its polling.

import { forgetKey, storedKey, storeKey } from "./api.js";
import { h, replaceChildren } from "./dom.js";
import { mountInterventionDetail, mountInterventionList } from "./interventions.js";
import { mountJobs } from "./jobs.js";
import { clearNotices, UNAUTHORIZED_EVENT } from "./notice.js";
import { mountPlayground } from "./playground.js";

const ROUTES = [
  { pattern: /^\/?(?:jobs)?$/, nav: "jobs", title: "Jobs", mount: mountJobs },
  { pattern: /^\/interventions$/, nav: "interventions", title: "Interventions", mount: mountInterventionList },
  { pattern: /^\/interventions\/([^/]+)$/, nav: "interventions", title: "Intervention", mount: mountInterventionDetail },
  { pattern: /^\/playground$/, nav: "playground", title: "Playground", mount: mountPlayground },
];

let cleanup = null;

function decode(component) {
  try {
    return decodeURIComponent(component);
  } catch {
    return component; // a malformed escape is kept as typed; the API answers 404 or 422 for it
  }
}

/** The route for a location hash: "#/interventions/abc?x=1" -> {route, args: ["abc"], query}. */
export function resolveRoute(hash) {
  const [path, search = ""] = hash.replace(/^#/, "").split("?", 2);
  for (const route of ROUTES) {
    const match = path.match(route.pattern);
    if (match) return { route, args: match.slice(1).map(decode), query: new URLSearchParams(search) };
  }
  return null;
}

function showKeyPanel(show) {
  document.getElementById("key-panel").hidden = !show;
}

function renderKeyState() {
  const key = storedKey();
  document.getElementById("key-summary").textContent = key ? `Key …${key.slice(-4)}` : "No API key";
  document.getElementById("forget-key").hidden = !key;
}

function render() {
  if (cleanup) cleanup();
  cleanup = null;
  const main = document.getElementById("main");
  const found = resolveRoute(location.hash);
  for (const link of document.querySelectorAll("nav a[data-route]")) {
    if (found && link.dataset.route === found.route.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!found) {
    replaceChildren(main, h("h1", {}, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Go to the jobs.")));
    return;
  }
  document.title = `${found.route.title} · EigenShift console`;
  renderKeyState();
  if (!storedKey()) {
    showKeyPanel(true);
    replaceChildren(main, h("h1", {}, found.route.title), h("p", {}, "Enter an API key above to use the console."));
    return;
  }
  replaceChildren(main);
  cleanup = found.route.mount(main, found.args, found.query) || null;
}

function start() {
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    if (!input.value.trim()) return;
    storeKey(input.value);
    input.value = "";
    showKeyPanel(false);
    clearNotices();
    render();
    document.getElementById("main").focus();
  });
  document.getElementById("change-key").addEventListener("click", () => {
    showKeyPanel(true);
    document.getElementById("api-key").focus();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    forgetKey();
    clearNotices();
    render();
  });
  window.addEventListener(UNAUTHORIZED_EVENT, () => showKeyPanel(true));
  window.addEventListener("hashchange", () => {
    clearNotices();
    render();
  });
  render();
}

start();
