// Playground: chat with any model, streamed over /api/chat, with its options; tokens/s.

import { getJSON, streamNDJSON } from "./api.js";
import { h, clear, toast } from "./dom.js";

let els = {};
let messages = [];
let ctrl = null;

export function mount(el, app) {
  els = {
    model: h("select", { id: "pg-model", onchange: () => defaults() }),
    defaults: h("p", { class: "muted", id: "pg-defaults" }),
    system: h("textarea", { id: "pg-system", rows: 2,
      placeholder: "system prompt (empty: the model's default)" }),
    temperature: h("input", { id: "pg-temperature", type: "number", step: "0.1", min: "0",
      max: "2", value: "0.7" }),
    maxTokens: h("input", { id: "pg-max-tokens", type: "number", min: "1", value: "256" }),
    seed: h("input", { id: "pg-seed", type: "number", placeholder: "random" }),
    log: h("div", { class: "chat", id: "pg-chat", "aria-live": "polite" }),
    input: h("textarea", { id: "pg-input", rows: 2, placeholder: "Say something…" }),
    send: h("button", { class: "primary", id: "pg-send", text: "Send" }),
    stop: h("button", { id: "pg-stop", text: "Stop", disabled: true }),
    stats: h("span", { class: "muted", id: "pg-stats" }),
  };
  const form = h("form", { id: "pg-form", onsubmit: (e) => { e.preventDefault(); send(); } },
    els.input, h("div", { class: "row" }, els.send, els.stop,
      h("button", { type: "button", text: "Clear", onclick: () => {
        messages = []; clear(els.log); els.stats.textContent = "";
      } }), els.stats));
  els.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  els.stop.addEventListener("click", (e) => { e.preventDefault(); if (ctrl) ctrl.abort(); });
  el.append(h("h1", { text: "Playground" }),
    h("div", { class: "row wrap options" },
      h("label", {}, "model ", els.model), h("label", {}, "temperature ", els.temperature),
      h("label", {}, "max tokens ", els.maxTokens), h("label", {}, "seed ", els.seed)),
    els.defaults, els.system, els.log, form);
  app.addEventListener("tags", () => {
    const current = els.model.value;
    clear(els.model);
    for (const n of app.modelNames()) els.model.append(h("option", { value: n, text: n }));
    if (current) els.model.value = current;
    defaults();
  });
}

// The model's own default options and system prompt (what an empty field leaves in place).
let shownFor = "";
function defaults() {
  const name = els.model.value;
  if (!name || name === shownFor) return;
  shownFor = name;
  getJSON(`/api/ui/model?name=${encodeURIComponent(name)}`).then((m) => {
    if (els.model.value !== name) return;
    const opts = Object.entries(m.options || {}).map(([k, v]) => `${k} ${JSON.stringify(v)}`);
    els.defaults.textContent = `${name}: context ${m.ctx_size}, ${m.parallel} slot(s)` +
      (opts.length ? `; default options: ${opts.join(", ")}` : "; no default options");
    els.system.placeholder = m.system ? `system prompt (default: ${m.system})`
      : "system prompt (none by default)";
  }).catch(() => { shownFor = ""; });
}

function bubble(role, text) {
  const el = h("div", { class: `msg ${role}`, dataset: { role } },
    h("span", { class: "who", text: role }), h("div", { class: "text", text }));
  els.log.append(el);
  els.log.scrollTop = els.log.scrollHeight;
  return el.querySelector(".text");
}

function options() {
  const o = {};
  const t = parseFloat(els.temperature.value);
  if (!Number.isNaN(t)) o.temperature = t;
  const n = parseInt(els.maxTokens.value, 10);
  if (n > 0) o.num_predict = n;
  const seed = parseInt(els.seed.value, 10);
  if (!Number.isNaN(seed)) o.seed = seed;
  return o;
}

async function send() {
  const text = els.input.value.trim();
  const model = els.model.value;
  if (!text || !model || ctrl) return;
  els.input.value = "";
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.parentElement.classList.add("streaming");
  const sys = els.system.value.trim();
  const body = { model, stream: true, options: options(),
    messages: sys ? [{ role: "system", content: sys }, ...messages] : [...messages] };
  ctrl = new AbortController();
  els.send.disabled = true;
  els.stop.disabled = false;
  const t0 = performance.now();
  let first = null;
  let answer = "";
  let chunks = 0;
  let final = null;
  els.stats.textContent = "waiting…";
  try {
    await streamNDJSON("/api/chat", body, (chunk) => {
      if (chunk.message && chunk.message.content) {
        if (first === null) first = performance.now();
        answer += chunk.message.content;
        out.textContent = answer;
        out.parentElement.dataset.chunks = String(++chunks);
        els.log.scrollTop = els.log.scrollHeight;
      }
      if (chunk.done) final = chunk;
    }, { signal: ctrl.signal });
  } catch (e) {
    if (!ctrl.signal.aborted) {
      out.parentElement.classList.add("error");
      out.textContent = answer ? `${answer}\n[${e.message}]` : e.message;
      toast(`chat: ${e.message}`, "error");
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    out.parentElement.dataset.done = "1";
    messages.push({ role: "assistant", content: answer });
    ctrl = null;
    els.send.disabled = false;
    els.stop.disabled = true;
  }
  els.stats.textContent = stats(final, t0, first);
}

function stats(final, t0, first) {
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - t0)} ms`);
  if (final && final.eval_count && final.eval_duration) {
    parts.push(`${final.eval_count} tokens`,
      `${(final.eval_count / (final.eval_duration / 1e9)).toFixed(1)} tokens/s`);
  }
  if (final && final.load_duration > 1e8) parts.push(`load ${(final.load_duration / 1e9).toFixed(2)} s`);
  return parts.join(" · ");
}
