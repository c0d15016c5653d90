// Logs: a worker's captured output, followed live; for a failed or stopped worker, the tail
// its last process left (the crash tail).

import { streamText } from "./api.js";
import { h, clear } from "./dom.js";

let pick;
let follow;
let out;
let note;
let crash;
let ctrl = null;
let shown = false;
const MAX_CHARS = 400000;

export function mount(el, app) {
  pick = h("select", { id: "logs-model", onchange: () => start(app) });
  follow = h("input", { type: "checkbox", id: "logs-follow", checked: true,
    onchange: () => start(app) });
  note = h("p", { class: "muted", id: "logs-note" });
  out = h("pre", { class: "logs", id: "logs-output", tabindex: 0 });
  crash = h("div", { id: "logs-crash" });
  el.append(h("h1", { text: "Logs" }),
    h("div", { class: "row wrap" }, h("label", {}, "model ", pick),
      h("label", { class: "check" }, follow, " follow"),
      h("button", { text: "Reload", onclick: () => start(app) })),
    note, crash, out);
  app.addEventListener("tags", () => fill(app));
}

function fill(app) {
  const current = pick.value;
  clear(pick);
  for (const n of app.modelNames()) pick.append(h("option", { value: n, text: n }));
  if (current) pick.value = current;
  if (shown && !ctrl && pick.value) start(app);
}

export function show(app) {
  shown = true;
  const want = decodeURIComponent((location.hash.split("/")[1] || ""));
  if (want && [...pick.options].some((o) => o.value === want)) pick.value = want;
  start(app);
}

export function onEvent(ev, app) {
  // A worker that failed or restarted: show its crash tail, or follow the new process.
  if (!shown || ev.type !== "model.state" || ev.model !== pick.value) return;
  if (["failed", "ready", "unloaded"].includes(ev.state)) start(app);
}

function start(app) {
  if (ctrl) ctrl.abort();
  const name = pick.value;
  clear(out);
  if (!name) { note.textContent = "no model"; ctrl = null; return; }
  const r = app.runner(name);
  const failed = app.failed(name);
  const live = r && r.state !== "failed";
  note.textContent = live
    ? `${name}: worker ${r.pid || ""} (${r.state})${follow.checked ? ", following" : ""}`
    : failed ? `${name} failed: the last worker's output (crash tail) — ${failed.reason.split("\n")[0]}`
      : `${name} is not loaded: the last worker's output, if any`;
  out.classList.toggle("crash", Boolean(failed));
  // The last crash's tail (the failed worker's last lines), while its successor runs.
  const lf = app.overview && app.overview.last_failure && app.overview.last_failure[name];
  clear(crash);
  if (lf && !failed) {
    crash.append(h("p", { class: "error", text: `last crash at ${new Date(lf.time * 1000)
      .toLocaleTimeString([], { hour12: false })}: the failed worker's last lines` }),
    h("pre", { class: "logs crash tail", text: lf.reason }));
  }
  const c = new AbortController();
  ctrl = c;
  const q = `/api/logs?model=${encodeURIComponent(name)}${follow.checked && live ? "&follow=1" : ""}`;
  streamText(q, (text) => {
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
    out.append(text);
    if (out.textContent.length > MAX_CHARS) out.textContent = out.textContent.slice(-MAX_CHARS / 2);
    if (atEnd) out.scrollTop = out.scrollHeight;
  }, { signal: c.signal }).catch(() => { /* aborted or ended */ })
    .finally(() => { if (ctrl === c) ctrl = null; });
}
