// The dashboard's shell: pages by URL hash, one shared store fed by /api/events, the key
// dialog. Each page module exports mount(el, app) and may export show() and onEvent(ev).

import { getJSON, isLoopbackPage, keyProvided, onAuthNeeded, openEvents, setKey, getKey }
  from "./api.js";
import { toast } from "./dom.js";
import * as overview from "./overview.js";
import * as models from "./models.js";
import * as activity from "./activity.js";
import * as logs from "./logs.js";
import * as playground from "./playground.js";

const PAGES = { overview, models, activity, logs, playground };

class App extends EventTarget {
  constructor() {
    super();
    this.overview = null; // /api/ui/overview
    this.tags = null; // /api/tags
    this._pending = {};
  }

  // Coalesced refreshes: events arriving while a fetch runs cause one more fetch, not many.
  refresh(what) {
    const p = this._pending[what] || (this._pending[what] = { running: false, again: false });
    if (p.running) { p.again = true; return; }
    p.running = true;
    const url = what === "overview" ? "/api/ui/overview" : "/api/tags";
    getJSON(url).then((data) => {
      this[what] = data;
      this.dispatchEvent(new CustomEvent(what, { detail: data }));
      // A model the list does not know yet (a config reload added it): list again.
      if (what === "overview" && this.tags) {
        const known = new Set(this.tags.models.map((m) => m.name));
        if (data.models.some((m) => !known.has(m.name))) this.refresh("tags");
      }
    }).catch((e) => {
      if (e.name !== "AbortError") toast(`${url}: ${e.message}`, "error");
    }).finally(() => {
      p.running = false;
      if (p.again) { p.again = false; this.refresh(what); }
    });
  }

  modelNames() {
    const names = new Set();
    for (const m of (this.tags && this.tags.models) || []) {
      if (!(m.routerd && m.routerd.alias_of)) names.add(m.name);
    }
    return [...names].sort();
  }

  runner(name) {
    return ((this.overview && this.overview.models) || []).find((m) => m.name === name);
  }

  failed(name) {
    return ((this.overview && this.overview.failed) || []).find((m) => m.name === name);
  }
}

export const app = new App();

function onEvent(ev) {
  const t = ev.type || "";
  if (t.startsWith("model.") || t === "budget" || t.startsWith("request.") || t === "hello") {
    app.refresh("overview");
  }
  if (t === "hello" || t.startsWith("catalog.") || t === "pull.done" || t === "model.deleted") {
    app.refresh("tags");
  }
  app.dispatchEvent(new CustomEvent("event", { detail: ev }));
  for (const page of Object.values(PAGES)) if (page.onEvent) page.onEvent(ev, app);
}

function setLive(state) {
  const el = document.getElementById("live");
  el.dataset.state = state;
  el.textContent = state;
}

function route() {
  const name = (location.hash || "#overview").slice(1).split("/")[0];
  const page = PAGES[name] ? name : "overview";
  for (const sec of document.querySelectorAll("section.page")) {
    sec.hidden = sec.dataset.page !== page;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `routerd · ${page}`;
  if (PAGES[page].show) PAGES[page].show(app);
}

function setupKeyDialog() {
  const dlg = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  onAuthNeeded((message) => {
    document.getElementById("key-error").textContent = getKey() ? message : "";
    input.value = "";
    if (!dlg.open) dlg.showModal();
  });
  form.addEventListener("submit", () => {
    setKey(input.value.trim());
    keyProvided();
  });
  dlg.addEventListener("cancel", (e) => e.preventDefault()); // a key is needed to go on
}

function main() {
  setupKeyDialog();
  document.body.dataset.origin = isLoopbackPage() ? "loopback" : "remote";
  for (const [name, page] of Object.entries(PAGES)) {
    page.mount(document.getElementById(`page-${name}`), app);
  }
  window.addEventListener("hashchange", route);
  route();
  openEvents(onEvent, setLive);
  app.refresh("overview");
  app.refresh("tags");
}

main();
