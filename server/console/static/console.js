// trainctl web console: runs, run (live charts + steering), compare, workers.
// No build step, no framework: plain DOM plus the vendored uPlot. The token lives in
// this tab's sessionStorage and goes out as an Authorization header (never a cookie).
"use strict";

const TC = window.__console = { charts: {}, latencies: [], markers: [], config: null, run: null, marks: {} };
const mark = (name) => { if (TC.marks[name] === undefined) TC.marks[name] = performance.now(); };
const $ = (sel, el = document) => el.querySelector(sel);
const FINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const COLORS = ["#2f6fed", "#e8590c", "#1f8a4c", "#ae3ec9", "#c62f2f", "#0c8599", "#b7791f", "#5c7cfa",
                "#868e96", "#d6336c", "#37b24d", "#1c7ed6"];

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}
const fmt = (v, d = 4) => v === null || v === undefined || Number.isNaN(v) ? "—"
  : (typeof v === "number" ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : +v.toPrecision(d)) : String(v));
const ago = (t) => { if (!t) return "—"; const s = Date.now() / 1000 - t;
  return s < 60 ? `${s | 0}s` : s < 3600 ? `${(s / 60) | 0}m` : s < 86400 ? `${(s / 3600) | 0}h` : `${(s / 86400) | 0}d`; };

// ------------------------------------------------------------------ API, auth, SSE
let token = sessionStorage.getItem("trainctl.token") || "";
let viewAbort = null;  // aborts the current view's streams on navigation

function headers(extra = {}) { return token ? { ...extra, authorization: `Bearer ${token}` } : extra; }

class ApiError extends Error {
  constructor(status, code, message) { super(`${code}: ${message}`); this.status = status; this.code = code; this.detail = message; }
}

async function api(path, body, signal) {
  const opts = { headers: headers(), signal };
  if (body !== undefined) {
    opts.method = "POST"; opts.body = JSON.stringify(body);
    opts.headers = headers({ "content-type": "application/json" });
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: "HTTP_" + r.status, message: r.statusText }));
  if (!r.ok) {
    const err = new ApiError(r.status, data.error, data.message);
    if (r.status === 401 || r.status === 403) askToken(err);
    throw err;
  }
  return data;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function stream(path, onMessage, signal, started = null) {
  const r = await (started || fetch(path, { headers: headers(), signal }));
  if (!r.ok) {
    const data = await r.json().catch(() => ({ error: "HTTP_" + r.status, message: r.statusText }));
    const err = new ApiError(r.status, data.error, data.message);
    if (r.status === 401 || r.status === 403) askToken(err);
    throw err;
  }
  setConn("live");
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of chunk.split("\n")) if (line.startsWith("data: ")) onMessage(JSON.parse(line.slice(6)));
    }
  }
}

function setConn(s) { $("#conn").className = "conn " + s; }
function banner(text) { const b = $("#banner"); b.textContent = text || ""; b.hidden = !text; }

function askToken(err) {
  const form = $("#token-form");
  $("#token-why").textContent = err
    ? (token ? `The server refused this token (${err.detail}). Enter a client token.`
             : `This server needs a client token (${err.detail}).`)
      + " It is kept in this tab only and sent as a header, never as a cookie."
    : $("#token-why").textContent;
  banner(err ? err.message : "");
  form.hidden = false;
  $("#token-input").focus();
}

$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token-input").value.trim();
  sessionStorage.setItem("trainctl.token", token);
  $("#token-form").hidden = true; banner("");
  $("#forget-token").hidden = !token;
  route();
});
$("#forget-token").addEventListener("click", () => {
  token = ""; sessionStorage.removeItem("trainctl.token"); $("#forget-token").hidden = true; route();
});

// ------------------------------------------------------------------ router
async function route() {
  if (viewAbort) viewAbort.abort();
  viewAbort = new AbortController();
  const signal = viewAbort.signal;
  for (const c of Object.values(TC.charts)) c.destroy();
  TC.charts = {}; TC.markers = []; TC.run = null;
  const view = $("#view"); view.replaceChildren();
  const hash = location.hash || "#/";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active",
    (a.dataset.nav === "runs" && (hash === "#/" || hash.startsWith("#/run") || hash.startsWith("#/compare")))
    || (a.dataset.nav === "workers" && hash.startsWith("#/workers"))));
  mark("route");
  // A run page's stream is asked for at once, beside the config (one round trip less).
  const runMatch = hash.match(/^#\/run\/(\d+)/);
  const early = runMatch ? fetch(`/api/experiments/${runMatch[1]}/stream?points=2000`, { headers: headers(), signal }) : null;
  if (early) early.catch(() => {});  // not awaited when the page asks for a token first
  if (!TC.config) TC.config = await (await fetch("/api/config")).json();
  mark("config");
  if (TC.config.auth && !token) { askToken(null); return; }
  $("#forget-token").hidden = !token;
  let m;
  try {
    if ((m = hash.match(/^#\/run\/(\d+)/))) await runView(view, +m[1], signal, early);
    else if ((m = hash.match(/^#\/compare\/([\d,]+)/))) await compareView(view, m[1].split(",").map(Number), signal);
    else if (hash.startsWith("#/workers")) await workersView(view, signal);
    else await runsView(view, signal);
  } catch (err) {
    if (err.name === "AbortError") return;
    setConn("down");
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return;  // the token form says it
    view.append(h("div", { class: "banner", id: "view-error" }, err.message));
  }
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ runs
async function runsView(view, signal) {
  const rows = new Map();  // id -> {x, m}
  const selected = new Set();
  let sortKey = "id", sortDir = -1;
  const stateSel = h("select", { id: "f-state", onchange: draw }, h("option", { value: "" }, "any state"),
    ...TC.config.states.map(s => h("option", { value: s }, s)));
  const tagIn = h("input", { id: "f-tag", placeholder: "tag", size: 10, oninput: draw });
  const nameIn = h("input", { id: "f-name", placeholder: "name contains", size: 16, oninput: draw });
  const cmpBtn = h("button", { id: "compare-btn", class: "primary", disabled: true,
    onclick: () => { location.hash = `#/compare/${[...selected].sort((a, b) => a - b).join(",")}`; } }, "Compare");
  const cols = [["", null], ["id", "id"], ["name", "name"], ["state", "state"], ["step", "step"], ["epoch", "epoch"],
    ["lr", "lr"], ["loss", "loss"], ["val_top1", "val_top1"], ["worker", "worker"], ["tags", null], ["age", "age"]];
  const thead = h("tr", {}, cols.map(([label, key]) => h("th", {
    onclick: () => { if (!key) return; sortDir = sortKey === key ? -sortDir : -1; sortKey = key; draw(); } }, label)));
  const tbody = h("tbody", { id: "runs-body" });
  view.append(h("div", { class: "toolbar" }, h("h2", {}, "Runs"), stateSel, tagIn, nameIn, cmpBtn,
    h("span", { class: "muted" }, "select two or more to compare")),
    h("table", { id: "runs" }, h("thead", {}, thead), tbody));

  const val = (r, key) => {
    const x = r.x, m = r.m;
    switch (key) {
      case "id": return x.id; case "name": return x.name; case "state": return x.state;
      case "step": return m.step ?? x.last_step; case "epoch": return m.epoch == null ? null : m.epoch + 1;  // 1-based, as in the CLI
      case "lr": return m.lr ?? null; case "loss": return m.loss ?? m.train_loss ?? x.summary.train_loss ?? null;
      case "val_top1": return m.val_top1 ?? x.summary.val_top1 ?? null; case "worker": return x.worker_id;
      case "age": return -(x.created_at || 0);
    }
  };
  function draw() {
    const st = stateSel.value, tag = tagIn.value.trim(), name = nameIn.value.trim().toLowerCase();
    const list = [...rows.values()].filter(r => r.x && (!st || r.x.state === st)
      && (!tag || r.x.tags.includes(tag)) && (!name || r.x.name.toLowerCase().includes(name)));
    list.sort((a, b) => { const va = val(a, sortKey), vb = val(b, sortKey);
      return (va === vb ? 0 : va === null ? 1 : vb === null ? -1 : va < vb ? -1 : 1) * sortDir; });
    tbody.replaceChildren(...list.map(r => {
      const x = r.x;
      const box = h("input", { type: "checkbox", checked: selected.has(x.id), onchange: (e) => {
        e.target.checked ? selected.add(x.id) : selected.delete(x.id); cmpBtn.disabled = selected.size < 2; } });
      return h("tr", { "data-id": x.id, "data-state": x.state },
        h("td", {}, box), h("td", {}, h("a", { href: `#/run/${x.id}` }, x.id)),
        h("td", {}, h("a", { href: `#/run/${x.id}` }, x.name)),
        h("td", {}, h("span", { class: `state state-${x.state}` }, x.state)),
        h("td", { class: "num" }, fmt(val(r, "step"))), h("td", { class: "num" }, fmt(val(r, "epoch"))),
        h("td", { class: "num" }, fmt(val(r, "lr"))), h("td", { class: "num" }, fmt(val(r, "loss"))),
        h("td", { class: "num" }, fmt(val(r, "val_top1"))), h("td", {}, x.worker_id || "—"),
        h("td", {}, x.tags.map(t => h("span", { class: "tag" }, t))), h("td", {}, ago(x.created_at)));
    }));
    cmpBtn.disabled = selected.size < 2;
  }
  const first = await api("/api/runs?limit=500", undefined, signal);
  for (const r of first.runs) rows.set(r.id, r);
  draw();
  let version = first.version;
  for (;;) {  // live; reconnect after a break (server restart) with a fresh list
    try {
      await stream(`/api/runs/stream?version=${version}`, (msg) => {
        if (msg.t !== "runs") return;
        version = msg.version;
        for (const r of msg.runs) {
          const old = rows.get(r.id);
          rows.set(r.id, { x: r.x || (old && old.x), m: { ...(old ? old.m : {}), ...r.m } });
        }
        draw();
      }, signal);
    } catch (err) { if (err.name === "AbortError" || err instanceof ApiError) throw err; }
    setConn("down");
    await new Promise(r => setTimeout(r, 2000));
    if (signal.aborted) return;
    const again = await api("/api/runs?limit=500", undefined, signal);
    for (const r of again.runs) rows.set(r.id, r);
    version = again.version; draw();
  }
}

// ------------------------------------------------------------------ workers
async function workersView(view, signal) {
  const body = h("tbody", { id: "workers-body" });
  const note = h("p", { class: "muted", id: "workers-note" });
  view.append(h("div", { class: "toolbar" }, h("h2", {}, "Workers")), h("table", { id: "workers" },
    h("thead", {}, h("tr", {}, ["worker", "host", "connected", "run", "devices", "utilisation", "memory", "last seen"]
      .map(t => h("th", {}, t)))), body), note);
  const gb = (b) => b ? `${(b / 2 ** 30).toFixed(1)} GiB` : "—";
  for (;;) {
    const data = await api("/api/workers", undefined, signal);
    body.replaceChildren(...data.workers.map(w => h("tr", { "data-worker": w.worker_id },
      h("td", {}, w.worker_id), h("td", {}, w.hostname), h("td", {}, w.connected ? "yes" : "no"),
      h("td", {}, w.experiment_id ? h("a", { href: `#/run/${w.experiment_id}` }, `${w.experiment_id} (attempt ${w.attempt})`) : "idle"),
      h("td", {}, w.devices.map(d => `${d.kind}:${d.index} ${d.name}`).join(", ") || "—"),
      h("td", {}, w.usage.length ? w.usage.map(u => h("div", {}, `${u.kind}:${u.index} `,
        h("span", { class: "bar" }, h("span", { style: `width:${Math.min(100, u.utilization || 0)}%` })),
        ` ${fmt(u.utilization, 3)}%`)) : "—"),
      h("td", {}, w.usage.length ? w.usage.map(u => h("div", {}, `${gb(u.memory_used_bytes)} / ${gb(u.memory_total_bytes)}`)) : "—"),
      h("td", {}, ago(w.last_seen) + " ago"))));
    note.textContent = data.usage_reported ? "Usage from each worker's latest heartbeat (NVML on GPUs, CPU and RSS otherwise)."
      : "No worker has reported device usage yet (it comes with their heartbeats): devices only.";
    setConn("live");
    await new Promise(r => setTimeout(r, 2000));
    if (signal.aborted) return;
  }
}

// Started once every script of the page has run (charts.js, run.js come after this one).
document.addEventListener("DOMContentLoaded", route);
