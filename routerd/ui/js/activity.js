// Activity: the last requests, live from `request.done` events, filterable by model; errors
// highlighted with their message.

import { getJSON } from "./api.js";
import { h, clear, clock, ms, num, toast } from "./dom.js";

const MAX = 200;
let rows = [];
let body;
let filter;
let loaded = false;

export function mount(el, app) {
  filter = h("select", { id: "activity-model", onchange: () => render() },
    h("option", { value: "", text: "all models" }));
  body = h("tbody");
  const table = h("table", { class: "activity", id: "activity-table" },
    h("thead", {}, h("tr", {}, ["time", "client", "model", "dialect", "route", "status",
      "prompt", "output", "TTFT", "tok/s", "load wait", "total"].map((t) => h("th", { text: t })))),
    body);
  el.append(h("h1", { text: "Activity" }),
    h("div", { class: "row" }, h("label", {}, "model ", filter)),
    h("div", { class: "scroll" }, table));
  app.addEventListener("tags", () => fillFilter(app));
}

function fillFilter(app) {
  const current = filter.value;
  clear(filter).append(h("option", { value: "", text: "all models" }));
  for (const n of app.modelNames()) filter.append(h("option", { value: n, text: n }));
  filter.value = current;
}

export function show() {
  if (loaded) { render(); return; }
  loaded = true;
  getJSON(`/api/ui/requests?n=${MAX}`).then((data) => {
    const seen = new Set(rows.map((r) => r.rid));
    rows = [...data.requests.filter((r) => !seen.has(r.rid)), ...rows].slice(-MAX);
    render();
  }).catch((e) => toast(`activity: ${e.message}`, "error"));
}

export function onEvent(ev) {
  if (ev.type !== "request.done") return;
  rows.push(ev);
  if (rows.length > MAX) rows.shift();
  if (loaded) render();
}

function render() {
  if (!body) return;
  clear(body);
  const want = filter.value;
  for (const r of [...rows].reverse()) {
    if (want && r.model !== want) continue;
    const bad = r.status >= 400 || r.error;
    const tr = h("tr", { class: bad ? "bad" : "", dataset: { model: r.model, status: r.status } },
      h("td", { text: clock(r.started || r.time) }), h("td", { text: r.client || "" }),
      h("td", { text: r.model }), h("td", { text: r.dialect }),
      h("td", { class: "path", text: `${r.method || ""} ${r.route}` }),
      h("td", { text: String(r.status) }), h("td", { text: num(r.prompt_tokens) }),
      h("td", { text: num(r.output_tokens) }), h("td", { text: ms(r.ttft_ms) }),
      h("td", { text: num(r.tokens_per_s, 1) }), h("td", { text: ms(r.load_wait_ms) }),
      h("td", { text: ms(r.duration_ms) }));
    body.append(tr);
    if (r.error) {
      body.append(h("tr", { class: "bad message" }, h("td", { colspan: 12, text: r.error })));
    }
  }
  if (!body.firstChild) {
    body.append(h("tr", {}, h("td", { colspan: 12, class: "muted", text: "no requests yet" })));
  }
}
