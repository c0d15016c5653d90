// Models: every model routerd knows, load / unload / pin / unpin, details, pull with live
// per-layer progress and cancel, delete with a confirmation naming what is freed.

import { getJSON, postJSON, call, streamNDJSON } from "./api.js";
import { h, clear, bytes, toast, confirmDialog } from "./dom.js";
import { act } from "./overview.js";

let table;
let pullBox;
const open = new Set(); // models whose details are shown
const cells = new Map(); // their details, fetched once per opening
let pulling = null;
let pullingName = "";
let elsewhere;
const others = new Map(); // pulls started by other clients, from pull.* events

export function mount(el, app) {
  table = h("table", { class: "models", id: "models-table" });
  pullBox = h("div", { id: "pull-progress", class: "pull" });
  const name = h("input", { id: "pull-name", name: "model", required: true,
    placeholder: "llama3.2:1b, hf.co/user/repo:Q4_K_M, https://…/x.gguf",
    autocomplete: "off", spellcheck: "false" });
  const insecure = h("input", { type: "checkbox", id: "pull-insecure" });
  const form = h("form", { id: "pull-form", class: "row wrap", onsubmit: (e) => {
    e.preventDefault();
    pull(name.value.trim(), insecure.checked, app);
  } }, name, h("label", { class: "check" }, insecure, " allow plain http"),
  h("button", { class: "primary", id: "pull-button", text: "Pull" }));
  elsewhere = h("div", { id: "pulls-elsewhere" });
  el.append(h("h1", { text: "Models" }), h("h2", { text: "Pull a model" }), form, pullBox,
    elsewhere,
    h("h2", { text: "Known models" }), h("div", { class: "scroll" }, table));
  app.addEventListener("tags", () => render(app));
  app.addEventListener("overview", () => render(app));
}

export function show(app) { render(app); }

export function onEvent(ev) {
  if (!ev.type.startsWith("pull.") || !elsewhere || ev.model === pullingName) return;
  if (ev.type === "pull.progress") {
    const p = others.get(ev.model) || { layers: new Map(), status: "" };
    p.status = ev.status;
    if (ev.digest && ev.total) p.layers.set(ev.digest, [ev.completed || 0, ev.total]);
    others.set(ev.model, p);
  } else {
    others.delete(ev.model);
  }
  clear(elsewhere);
  for (const [name, p] of others) {
    let done = 0;
    let total = 0;
    for (const [c, t] of p.layers.values()) { done += c; total += t; }
    elsewhere.append(h("div", { class: "pull", dataset: { pulling: name } },
      h("b", { text: name }), h("span", { class: "muted", text: ` pulled by another client: ${p.status}` }),
      h("progress", { max: 1, value: total ? done / total : 0 })));
  }
}

function sourceOf(m) { return (m.routerd && m.routerd.source) || "store"; }

function render(app) {
  if (!table || !app.tags) return;
  clear(table);
  table.append(h("thead", {}, h("tr", {},
    ["Model", "Source", "Size", "Format", "State", ""].map((t) => h("th", { text: t })))));
  const body = h("tbody");
  for (const m of app.tags.models) {
    if (m.routerd && m.routerd.alias_of) continue;
    const r = app.runner(m.name);
    const failed = app.failed(m.name);
    const peers = m.routerd && m.routerd.peers; // another host's model (routerd/peers/)
    const state = peers ? (peers.some((p) => p.up) ? "on peer" : "peer down")
      : r ? r.state : failed ? "failed" : "available";
    const d = m.details || {};
    const row = h("tr", { dataset: { model: m.name, state } },
      h("td", {}, h("b", { text: m.name }),
        m.routerd && m.routerd.aliases && m.routerd.aliases.length
          ? h("div", { class: "muted", text: `aliases: ${m.routerd.aliases.join(", ")}` }) : null,
        h("div", { class: "muted path", text: (m.routerd && m.routerd.location) || "" })),
      h("td", { text: sourceOf(m) }),
      h("td", { text: bytes(m.size) }),
      h("td", { text: [d.family, d.parameter_size, d.quantization_level].filter(Boolean)
        .join(" · ") || "–" }),
      h("td", {}, h("span", { class: `badge state-${state}`, text: state })),
      h("td", { class: "actions" }, peers ? null : actions(m, r, app)));
    body.append(row);
    if (open.has(m.name)) {
      // Fetched once when opened, then kept: re-renders on events do not refetch.
      let cell = cells.get(m.name);
      if (!cell) {
        cell = h("td", { colspan: 6 });
        cells.set(m.name, cell);
        details(m.name, cell);
      }
      body.append(h("tr", { class: "details", dataset: { detailsOf: m.name } }, cell));
    }
  }
  table.append(body);
}

function actions(m, r, app) {
  const out = [];
  const btn = (label, action, fn, cls) => h("button", { "data-action": action, class: cls,
    onclick: fn, text: label });
  if (!r || r.state === "queued") {
    out.push(btn("Load", "load", () => load(m.name), "primary"));
  } else {
    out.push(btn("Unload", "unload", () => act(m.name, 0, "unloading", app)));
  }
  if (r && r.pinned) out.push(btn("Unpin", "unpin", () => act(m.name, r.keep_alive_default ?? "5m", "unpinned", app)));
  else out.push(btn("Pin", "pin", () => act(m.name, -1, "pinned", app)));
  out.push(btn(open.has(m.name) ? "Hide" : "Details", "details", () => {
    if (open.has(m.name)) open.delete(m.name); else open.add(m.name);
    cells.delete(m.name);
    render(app);
  }));
  if (sourceOf(m) === "store") {
    out.push(btn("Delete", "delete", () => remove(m, app), "danger"));
  }
  return out;
}

async function load(name) {
  toast(`loading ${name}…`);
  try {
    await postJSON("/api/generate", { model: name, prompt: "" });
    toast(`${name} ready`);
  } catch (e) {
    toast(`${name}: ${e.message}`, "error");
  }
}

async function details(name, cell) {
  cell.append(h("p", { class: "muted", text: "loading details…" }));
  try {
    const [info, show] = await Promise.all([
      getJSON(`/api/ui/model?name=${encodeURIComponent(name)}`),
      postJSON("/api/show", { model: name }),
    ]);
    clear(cell);
    const mem = h("table", { class: "mini" }, h("tr", {},
      ["resource", "estimate", "booked", "last measured", "held now"].map((t) =>
        h("th", { text: t }))));
    for (const res of Object.keys({ ...info.estimate, ...info.last_measured })) {
      const held = info.loaded ? (info.loaded.measured[res] ?? info.loaded.booked[res]) : null;
      mem.append(h("tr", {}, h("td", { text: res }), h("td", { text: bytes(info.estimate[res]) }),
        h("td", { text: bytes(info.booked[res]) }),
        h("td", { text: bytes(info.last_measured[res]) }), h("td", { text: bytes(held) })));
    }
    const meta = h("table", { class: "mini meta" });
    for (const [k, v] of Object.entries(show.model_info || {})) {
      meta.append(h("tr", {}, h("td", { text: k }),
        h("td", { text: Array.isArray(v) ? `[${v.length} items]` : String(v) })));
    }
    cell.append(
      h("div", { class: "two" },
        h("div", {}, h("h4", { text: "Memory" }), mem,
          h("h4", { text: "Started as" }), h("pre", { class: "argv", text: info.argv.join(" ") }),
          h("dl", { class: "kv" },
            h("dt", { text: "file" }), h("dd", { class: "path", text: info.file || "–" }),
            h("dt", { text: "context" }), h("dd", { text: String(info.ctx_size) }),
            h("dt", { text: "parallel" }), h("dd", { text: String(info.parallel) }),
            h("dt", { text: "options" }), h("dd", { text: JSON.stringify(info.options) }),
            h("dt", { text: "system" }), h("dd", { text: info.system || "–" }))),
        h("div", {}, h("h4", { text: "GGUF metadata" }), h("div", { class: "scroll meta-box" }, meta))));
  } catch (e) {
    clear(cell);
    cell.append(h("p", { class: "error", text: e.message }));
  }
}

async function remove(m, app) {
  const ok = await confirmDialog(`Delete ${m.name}?`,
    `This deletes the model ${m.name} from routerd's store and frees up to ${bytes(m.size)} ` +
    "on disk (its layers that no other model uses).");
  if (!ok) return;
  open.delete(m.name);
  cells.delete(m.name);
  try {
    await call("/api/delete", { method: "DELETE", body: { model: m.name } });
    toast(`${m.name} deleted`);
  } catch (e) {
    toast(`${m.name}: ${e.message}`, "error");
  }
  app.refresh("tags");
}

function pull(name, insecure, app) {
  if (!name || pulling) return;
  const ctrl = new AbortController();
  const layers = new Map();
  const status = h("div", { class: "pull-status", id: "pull-status", text: "starting…" });
  const list = h("div", { class: "layers" });
  const overall = h("progress", { id: "pull-overall", max: 1, value: 0 });
  const pct = h("span", { id: "pull-percent", text: "0%" });
  const cancel = h("button", { id: "pull-cancel", text: "Cancel", onclick: () => ctrl.abort() });
  clear(pullBox).append(h("div", { class: "row between" }, h("b", { text: name }), cancel),
    h("div", { class: "row" }, overall, pct), status, list);
  pulling = ctrl;
  pullingName = name;
  const update = (ev) => {
    status.textContent = ev.status;
    if (ev.digest && ev.total) {
      let row = layers.get(ev.digest);
      if (!row) {
        row = { bar: h("progress", { max: ev.total, value: 0 }), label: h("span") };
        layers.set(ev.digest, { ...row, total: ev.total, done: 0 });
        list.append(h("div", { class: "layer", dataset: { digest: ev.digest } },
          h("code", { text: ev.digest.replace("sha256:", "").slice(0, 12) }), row.bar, row.label));
      }
      const l = layers.get(ev.digest);
      l.done = ev.completed || 0;
      l.bar.value = l.done;
      l.label.textContent = `${bytes(l.done)} / ${bytes(l.total)}`;
    }
    let total = 0;
    let done = 0;
    for (const l of layers.values()) { total += l.total; done += l.done; }
    if (ev.status === "success") { total = Math.max(total, 1); done = total; }
    if (total) {
      overall.value = done / total;
      pct.textContent = `${Math.floor((100 * done) / total)}%`;
    }
  };
  streamNDJSON("/api/pull", { model: name, insecure, stream: true }, update,
    { signal: ctrl.signal })
    .then(() => {
      pullBox.dataset.result = "success";
      toast(`${name} pulled`);
    })
    .catch((e) => {
      pullBox.dataset.result = ctrl.signal.aborted ? "cancelled" : "error";
      status.textContent = ctrl.signal.aborted ? "cancelled" : e.message;
      status.classList.add("error");
      if (!ctrl.signal.aborted) toast(`pull ${name}: ${e.message}`, "error");
    })
    .finally(() => {
      pulling = null;
      pullingName = "";
      cancel.disabled = true;
      app.refresh("tags");
    });
}
