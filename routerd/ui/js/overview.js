// Overview: one bar per budget (booked per model, estimate vs measured, free, reserve), the
// loaded models with their state, slots, queue and keep-alive, host facts, last-hour charts.

import { postJSON, getJSON } from "./api.js";
import { h, clear, bytes, duration, colorOf, toast } from "./dom.js";
import { lineChart } from "./charts.js";

let root;
let parts = {};
let history = null;
let historyPending = false;

export function mount(el, app) {
  root = el;
  parts = {
    budgets: h("div", { class: "budgets", id: "budgets" }),
    models: h("div", { class: "cards", id: "loaded" }),
    failed: h("div", { id: "failed" }),
    host: h("dl", { class: "facts", id: "host" }),
    charts: h("div", { class: "charts", id: "charts" }),
    queue: h("span", { class: "muted", id: "queue" }),
    peers: h("div", { class: "cards", id: "peers" }),
  };
  el.append(
    h("h1", { text: "Overview" }),
    h("h2", { text: "Memory budgets" }), parts.budgets,
    h("div", { class: "row between" }, h("h2", { text: "Loaded models" }), parts.queue),
    parts.failed, parts.models,
    parts.peers,
    h("div", { class: "two" },
      h("div", {}, h("h2", { text: "Last hour" }), parts.charts),
      h("div", {}, h("h2", { text: "Host" }), parts.host)),
  );
  app.addEventListener("overview", () => render(app));
  setInterval(tick, 1000); // the keep-alive countdowns count down here, from known deadlines
}

export function show(app) {
  if (app.overview) render(app);
  loadHistory();
}

export function onEvent(ev) {
  if (ev.type === "request.done" && ev.tokens_per_s && history) {
    const pts = history.tokens_per_s[ev.model] || (history.tokens_per_s[ev.model] = []);
    pts.push([ev.time, ev.tokens_per_s]);
    if (root && !root.hidden) drawCharts();
  }
  if (ev.type === "model.state" && ev.booked && history && root && !root.hidden) {
    const byRes = history.memory[ev.model] || (history.memory[ev.model] = {});
    for (const [res, n] of Object.entries(ev.booked)) {
      (byRes[res] || (byRes[res] = [])).push([ev.time, n]);
    }
    drawCharts();
  }
}

function loadHistory() {
  if (historyPending) return;
  historyPending = true;
  getJSON("/api/ui/history").then((data) => { history = data; drawCharts(); })
    .catch((e) => toast(`history: ${e.message}`, "error"))
    .finally(() => { historyPending = false; });
}

function render(app) {
  const o = app.overview;
  if (!o) return;
  renderBudgets(o);
  renderModels(o, app);
  renderPeers(o.peers || []);
  renderHost(o.host);
}

// Other hosts (routerd/peers/): health, latency, what is loaded there, a routerd peer's budget.
function renderPeers(peers) {
  clear(parts.peers);
  if (!peers.length) return;
  parts.peers.append(h("h2", { text: "Peers" }));
  for (const p of peers) {
    const budget = Object.entries(p.budget || {}).map(([k, v]) => `${k} ${bytes(v)}`).join(", ");
    parts.peers.append(h("div", { class: "card", dataset: { peer: p.name } },
      h("div", {}, h("b", { text: p.name }), " ",
        h("span", { class: `badge state-${p.up ? "ready" : "failed"}`, text: p.up ? "up" : "down" })),
      h("div", { class: "muted path", text: `${p.kind} · ${p.url}` }),
      h("div", { text: `${p.models} models · loaded: ${(p.loaded || []).join(", ") || "none"}` }),
      h("div", { class: "muted", text: [p.latency_ms != null ? `poll ${p.latency_ms} ms` : "",
        `${p.inflight} in flight`, budget ? `budget ${budget}` : ""].filter(Boolean).join(" · ") }),
      p.error ? h("div", { class: "muted", text: p.error }) : null));
  }
}

function renderBudgets(o) {
  clear(parts.budgets);
  for (const b of o.budgets) {
    const total = Math.max(b.total, 1);
    const pct = (n) => `${(100 * n) / total}%`;
    const bar = h("div", { class: "bar", role: "img", dataset: { resource: b.resource },
      "aria-label": `${b.label}: ${bytes(b.booked)} booked of ${bytes(b.budget)}` });
    const legend = h("ul", { class: "legend" });
    for (const m of b.models) {
      const measured = m.measured !== null && m.measured !== undefined;
      const seg = h("div", {
        class: `seg model ${measured ? "measured" : "estimated"}`,
        style: { width: pct(m.booked), "--c": colorOf(m.name) },
        dataset: { model: m.name, booked: m.booked },
        title: `${m.name}: booked ${bytes(m.booked)} (${measured ? "measured" : "estimate"})`,
      });
      if (measured && m.estimate) {
        // The estimate as a tick inside (or past) the measured segment.
        const at = Math.min(100, (100 * m.estimate) / Math.max(m.booked, 1));
        seg.append(h("span", { class: "est-tick", style: { left: `${at}%` },
          title: `estimate ${bytes(m.estimate)}` }));
      }
      bar.append(seg);
      legend.append(h("li", {},
        h("span", { class: `swatch ${measured ? "measured" : "estimated"}`,
          style: { "--c": colorOf(m.name) } }),
        h("b", { text: m.name }), ` ${bytes(m.booked)} `,
        h("span", { class: "muted",
          text: measured ? `measured ${bytes(m.measured)} · estimate ${bytes(m.estimate)}`
            : `estimate ${bytes(m.estimate)} · not measured yet` })));
    }
    bar.append(h("div", { class: "seg free", style: { width: pct(b.free) },
      dataset: { free: b.free }, title: `free ${bytes(b.free)}` }));
    if (b.other) {
      bar.append(h("div", { class: "seg other", style: { width: pct(b.other) },
        title: `held by other processes ${bytes(b.other)}` }));
    }
    bar.append(h("div", { class: "seg reserve", style: { width: pct(b.reserve) },
      title: `reserve (outside the budget) ${bytes(b.reserve)}` }));
    legend.append(...[
      h("li", {}, h("span", { class: "swatch free" }), "free ", bytes(b.free)),
      b.other ? h("li", {}, h("span", { class: "swatch other" }), "other processes ",
        bytes(b.other)) : null,
      h("li", {}, h("span", { class: "swatch reserve" }), "reserve ", bytes(b.reserve)),
    ].filter(Boolean));
    parts.budgets.append(h("div", { class: "budget", dataset: { resource: b.resource } },
      h("div", { class: "row between" },
        h("strong", { text: b.label }),
        h("span", { class: "muted",
          text: `${bytes(b.booked)} booked · budget ${bytes(b.budget)} of ${bytes(b.total)}` })),
      bar, legend));
  }
}

function stateBadge(m) {
  const label = m.state === "busy" ? `busy ${m.in_flight}/${m.parallel}` : m.state;
  return h("span", { class: `badge state-${m.state}`, dataset: { state: m.state }, text: label });
}

function renderModels(o, app) {
  parts.queue.textContent = `${o.queue} request${o.queue === 1 ? "" : "s"} waiting in the queue`;
  clear(parts.failed);
  for (const f of o.failed) {
    parts.failed.append(h("div", { class: "alert error", dataset: { failed: f.name } },
      h("b", { text: `${f.name} failed` }), h("pre", { text: f.reason })));
  }
  clear(parts.models);
  if (!o.models.length) {
    parts.models.append(h("p", { class: "muted empty", text:
      "No model is loaded. Load one from the Models page, or send it a request." }));
  }
  for (const m of o.models) {
    const card = h("article", { class: "card", dataset: { model: m.name, state: m.state } });
    const head = h("div", { class: "row between" }, h("h3", { text: m.name }), stateBadge(m));
    card.append(head);
    if (m.state === "loading" || m.state === "queued" || m.state === "reloading") {
      const prog = h("progress", { max: 1, class: "load" });
      if (m.progress !== undefined) prog.value = m.progress;
      card.append(h("div", { class: "loading" }, prog, h("span", { class: "muted",
        text: m.loading_for !== undefined ? ` ${m.loading_for.toFixed(1)} s` : "" })));
    }
    const keep = m.pinned ? "pinned" : m.unload_when_idle
      ? h("span", { class: "warn", dataset: { unloading: "1" },
        text: "unloads when its requests finish" })
      : m.expires_at
      ? h("span", { class: "countdown", dataset: { deadline: m.expires_at },
        text: duration(m.expires_at - Date.now() / 1000) })
      : m.in_flight ? "while busy" : "–";
    const dl = h("dl", { class: "kv" },
      h("dt", { text: "slots" }), h("dd", { text: `${m.in_flight ?? 0} / ${m.parallel ?? "–"}` }),
      h("dt", { text: "queued" }), h("dd", { text: String(m.queued ?? 0) }),
      h("dt", { text: "context" }), h("dd", { text: m.ctx_size ? String(m.ctx_size) : "–" }),
      h("dt", { text: "keep-alive" }), h("dd", {}, keep),
      h("dt", { text: "backend" }), h("dd", { text: m.backend || "–" }),
      h("dt", { text: "pid" }), h("dd", { text: m.pid ? String(m.pid) : "–" }),
      h("dt", { text: "memory" }), h("dd", { text: memText(m) }),
      h("dt", { text: "prompt cache" }), h("dd", { dataset: { cache: m.name },
        text: m.prompt_cache_bytes ? `${(m.prompt_cache_bytes / 1048576).toFixed(1)} MiB saved`
          : "–" }));
    card.append(dl);
    const lf = (o.last_failure || {})[m.name];
    if (lf && Date.now() / 1000 - lf.time < 600) {
      card.append(h("div", { class: "last-failure", dataset: { failure: m.name } },
        h("b", { class: "error", text: `${m.state === "ready" ? "restarted after a failure"
          : "failed"} ${duration(Date.now() / 1000 - lf.time)} ago` }),
        h("pre", { class: "error", text: lf.reason })));
    }
    card.append(h("div", { class: "row" },
      h("button", { onclick: () => act(m.name, 0, "unloading", app), "data-action": "unload",
        text: "Unload" }),
      m.pinned
        ? h("button", { onclick: () => act(m.name, m.keep_alive_default ?? "5m", "unpinned", app),
          "data-action": "unpin", text: "Unpin" })
        : h("button", { onclick: () => act(m.name, -1, "pinned", app), "data-action": "pin",
          text: "Pin" })));
    parts.models.append(card);
  }
}

function memText(m) {
  const res = Object.keys(m.booked || {});
  if (!res.length) return "–";
  return res.map((r) => {
    const meas = m.measured && m.measured[r];
    return `${r} ${bytes(m.booked[r])}${meas ? " measured" : " estimated"}`;
  }).join(", ");
}

// Load, unload, pin, unpin: Ollama's empty-prompt generate with a keep_alive. An unload of a
// busy model or a new keep-alive publishes no event of its own: refresh the overview.
export async function act(name, keepAlive, done, app) {
  try {
    await postJSON("/api/generate", { model: name, prompt: "", keep_alive: keepAlive });
    toast(`${name} ${done}`);
  } catch (e) {
    toast(`${name}: ${e.message}`, "error");
  }
  if (app) app.refresh("overview");
}

function renderHost(host) {
  clear(parts.host);
  const add = (k, v) => parts.host.append(h("dt", { text: k }), h("dd", { text: v }));
  add("host", host.hostname);
  add("cores", String(host.cores));
  add("RAM", `${bytes(host.ram_total)} (${bytes(host.ram_available)} available)`);
  add("GPUs", host.gpus.length ? host.gpus.map((g) => `${g.index}: ${g.name} ${bytes(g.total)}`)
    .join(", ") : "none");
  add("load", host.load.join(" "));
  add("system", host.platform);
  add("routerd", `${host.routerd} (Python ${host.python})`);
  for (const [k, v] of Object.entries(host.engines || {})) add(k, v);
}

function drawCharts() {
  if (!history) return;
  clear(parts.charts);
  const now = Date.now() / 1000;
  const from = now - history.window;
  const tokens = Object.entries(history.tokens_per_s).map(([name, pts]) => ({ name, pts }));
  const top = Math.max(0, ...tokens.flatMap((t) => t.pts.map((p) => p[1])));
  parts.charts.append(lineChart("tokens/s per request", tokens, { from, to: now,
    format: (v) => v.toFixed(top < 10 ? 1 : 0), id: "chart-tokens" }));
  const mem = [];
  for (const [name, byRes] of Object.entries(history.memory)) {
    for (const [res, pts] of Object.entries(byRes)) mem.push({ name: `${name} ${res}`, pts });
  }
  parts.charts.append(lineChart("memory per model", mem, { from, to: now, format: bytes,
    id: "chart-memory", step: true }));
}

function tick() {
  if (!root || root.hidden) return;
  const now = Date.now() / 1000;
  for (const el of root.querySelectorAll(".countdown")) {
    el.textContent = duration(Number(el.dataset.deadline) - now);
  }
}
