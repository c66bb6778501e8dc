// Talking to the v1 API: the API key (this tab's session storage only), requests, and the API's
// JSON errors turned into an ApiError whose message can be shown as it is.

const KEY_NAME = "videoqa.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = Array.isArray(details) ? details : [];
  }

  get needsKey() {
    return this.status === 401;
  }
}

// The key travels in a header, never in a URL (URLs end up in logs and histories).
export function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page, say): described by its status below.
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.code || "error", error.message, error.details);
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError(response.status, `http_${response.status}`, `the service answered ${response.status}${reason}`);
}

export async function call(method, path, { json, form, signal, headers } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser writes the multipart boundary itself
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", "the service did not answer; is it running?");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function callJson(method, path, options) {
  return (await call(method, path, options)).json();
}

export const listJobs = (limit = 20) => callJson("GET", `/v1/jobs?limit=${limit}`);
export const getJob = (id) => callJson("GET", `/v1/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id) => callJson("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
export const submitJob = (body) => callJson("POST", "/v1/jobs", body instanceof FormData ? { form: body } : { json: body });

// An <img> cannot send a header, so frames are fetched with the key and shown as blob: URLs;
// the caller revokes them when it shows another job.
export async function frameUrl(jobId, n, signal) {
  const response = await call("GET", `/v1/jobs/${encodeURIComponent(jobId)}/frames/${n}`, { signal });
  return URL.createObjectURL(await response.blob());
}

export function describe(error) {
  if (!(error instanceof ApiError)) return String((error && error.message) || error);
  const lines = [`${error.message} (${error.code}${error.status ? `, ${error.status}` : ""})`];
  for (const detail of error.details) {
    const line = detail && detail.field && detail.message ? `${detail.field}: ${detail.message}` : "";
    if (line && !error.message.includes(line)) lines.push(line); // the message often holds them already
  }
  return lines.join("\n");
}
