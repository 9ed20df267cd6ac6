// Calls to the EigenShift API with the stored key; errors become ApiError from their problem+json body (or
// OpenAI's error envelope on /v1/...).

const KEY_NAME = "eigenshift.apiKey";

export function storedKey() {
  return localStorage.getItem(KEY_NAME) || "";
}

export function storeKey(key) {
  localStorage.setItem(KEY_NAME, key.trim());
}

export function forgetKey() {
  localStorage.removeItem(KEY_NAME);
}

/** A failed call: the HTTP status and the title/detail of its RFC 9457 body (status 0: no answer). */
export class ApiError extends Error {
  constructor(status, title, detail, retryAfterS = null) {
    super(`${title}: ${detail}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }
}

async function problemOf(response) {
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  const retryAfterS = Number.isFinite(retry) ? retry : null;
  let title = response.statusText || "Error";
  let detail = "";
  try {
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) {
      const body = await response.json();
      if (body.error && typeof body.error === "object") {
        // OpenAI's envelope, on the OpenAI-compatible routes (/v1/...).
        detail = typeof body.error.message === "string" ? body.error.message : "";
      } else {
        title = typeof body.title === "string" ? body.title : title;
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? "");
      }
    } else {
      detail = (await response.text()).slice(0, 300);
    }
  } catch {
    // An unreadable body still leaves the status to report.
  }
  return new ApiError(response.status, title, detail, retryAfterS);
}

async function send(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json, application/problem+json, */*" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "No answer", `the API could not be reached (${error.message})`);
  }
  if (!response.ok) throw await problemOf(response);
  return response;
}

/** The JSON answer of an API call; throws ApiError. */
export async function api(path, options) {
  const response = await send(path, options);
  return response.status === 204 ? null : response.json();
}

/** The raw bytes of an API answer (artifacts). */
export async function apiBytes(path, options) {
  return (await send(path, options)).arrayBuffer();
}

/** Download an artifact with the key: fetch it, then save the blob under its last path component. */
export async function download(path, filename) {
  const blob = await (await send(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** What to tell a person about a failed call. */
export function describeError(error) {
  if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
  const detail = error.detail ? ` ${error.detail.replace(/[.\s]+$/, "")}.` : "";
  switch (error.status) {
    case 0:
      return `The API did not answer: ${error.detail}.`;
    case 401:
      return `The API key was refused (401 ${error.title}).${detail} Enter a valid key.`;
    case 403:
      return `This key is not allowed to do that (403 ${error.title}).${detail}`;
    case 429: {
      const wait = error.retryAfterS ? ` Try again in ${error.retryAfterS} s.` : "";
      return `Too many requests with this key (429 ${error.title}).${detail}${wait}`;
    }
    default:
      return `${error.title} (${error.status}).${detail}`;
  }
}
