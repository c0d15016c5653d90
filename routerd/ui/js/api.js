// Talking to routerd: this page's own origin only. The API key (when one is needed) lives in
// this tab's sessionStorage and goes only into requests to that origin: every path here must
// be absolute on this origin ("/api/..."), never a URL.

const KEY = "routerd.api_key";
const listeners = new Set();

export function getKey() {
  try { return sessionStorage.getItem(KEY) || ""; } catch { return ""; }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  } catch { /* storage disabled: the key lives as long as the request */ }
}

export function isLoopbackPage() {
  const h = location.hostname.replace(/^\[|\]$/g, "");
  return h === "localhost" || h.endsWith(".localhost") || h === "::1" || /^127\./.test(h);
}

// Called with "auth" when routerd answers 401: the app asks for a key, then retries.
export function onAuthNeeded(fn) { listeners.add(fn); }

let waitingForKey = null;

export function keyProvided() {
  if (waitingForKey) { waitingForKey.resolve(); waitingForKey = null; }
}

function askForKey(message) {
  if (!waitingForKey) {
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    waitingForKey = { promise, resolve };
    for (const fn of listeners) fn(message);
  }
  return waitingForKey.promise;
}

function sameOrigin(path) {
  if (typeof path !== "string" || !path.startsWith("/") || path.startsWith("//")) {
    throw new Error(`refusing to send a request outside this origin: ${path}`);
  }
  return path;
}

function headersFor(extra) {
  const h = new Headers(extra || {});
  const key = getKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(resp) {
  let text = "";
  try { text = await resp.text(); } catch { /* body gone */ }
  let message = text || resp.statusText;
  try {
    const data = JSON.parse(text);
    const e = data.error;
    message = typeof e === "string" ? e : (e && e.message) || message;
  } catch { /* not JSON */ }
  return new ApiError(resp.status, message);
}

// fetch() on this origin with the key; a 401 asks for a key once and retries.
export async function call(path, { method = "GET", body, signal, headers } = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const init = { method, signal, headers: headersFor(headers), credentials: "omit",
                   cache: "no-store", redirect: "error" };
    if (body !== undefined) {
      init.body = typeof body === "string" ? body : JSON.stringify(body);
      init.headers.set("Content-Type", "application/json");
    }
    const resp = await fetch(sameOrigin(path), init);
    if (resp.status === 401) {
      const err = await errorOf(resp);
      await askForKey(err.message);
      continue;
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }
  throw new ApiError(401, "no valid API key");
}

export async function getJSON(path, opts) {
  return (await call(path, opts)).json();
}

export async function postJSON(path, body, opts = {}) {
  const resp = await call(path, { ...opts, method: opts.method || "POST", body });
  const text = await resp.text();
  return text ? JSON.parse(text) : {};
}

// Read a streamed NDJSON answer (pull, chat); `onLine` gets each parsed object. An in-band
// {"error": ...} line raises.
export async function streamNDJSON(path, body, onLine, { signal } = {}) {
  const resp = await call(path, { method: "POST", body, signal });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line) continue;
      const obj = JSON.parse(line);
      if (obj.error) throw new ApiError(200, obj.error);
      onLine(obj);
    }
  }
  if (buf.trim()) {
    const obj = JSON.parse(buf);
    if (obj.error) throw new ApiError(200, obj.error);
    onLine(obj);
  }
}

// Plain text, streamed line by line (logs with follow).
export async function streamText(path, onText, { signal } = {}) {
  const resp = await call(path, { signal });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

// The event stream (/api/events, SSE) read with fetch so the key goes in a header, never in
// a URL. Reconnects with Last-Event-ID after a break (with a growing pause, not a poll).
export function openEvents(onEvent, onStatus) {
  let lastId = null;
  let stopped = false;
  let ctrl = null;
  let pause = 500;

  function dispatch(frame) {
    let id = null;
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (id !== null) lastId = id;
    if (!data.length) return;
    try { onEvent(JSON.parse(data.join("\n"))); } catch (e) { console.warn("bad event", e); }
  }

  async function run() {
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const resp = await call("/api/events", { headers, signal: ctrl.signal });
        onStatus("live");
        pause = 500;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n/g, "\n");
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            dispatch(buf.slice(0, end));
            buf = buf.slice(end + 2);
          }
        }
      } catch (e) {
        if (stopped) return;
      }
      if (stopped) return;
      onStatus("reconnecting");
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 10000);
    }
  }

  run();
  return { close() { stopped = true; if (ctrl) ctrl.abort(); } };
}
