// The run page: live charts, the steering panel, tags and note, control log, spec.
// Loaded after console.js and charts.js.
"use strict";

// ------------------------------------------------------------------ run page
async function runView(view, id, signal, early = null) {
  const data = new RunData();
  let controls = [], exp = null, mode = "step", logScale = false, zoomed = false, pendingDraw = false;
  let latestWall = null;  // wall_time of the oldest live row not drawn yet
  const chartsEl = h("div", { id: "charts" });
  const title = h("h2", { id: "run-title" }, `Run ${id}`);
  const stateEl = h("span", { id: "run-state" });
  const axisSel = h("select", { id: "x-axis", onchange: () => { mode = axisSel.value; rebuild(); } },
    h("option", { value: "step" }, "x: step"), h("option", { value: "epoch" }, "x: epoch"),
    h("option", { value: "wall" }, "x: wall time (s)"));
  const logBox = h("input", { type: "checkbox", id: "log-scale", onchange: () => { logScale = logBox.checked; rebuild(); } });
  const resetBtn = h("button", { onclick: () => { zoomed = false; rebuild(); } }, "reset zoom");
  const side = h("div", {});
  const below = h("div", {});
  view.append(h("div", { class: "toolbar" }, title, stateEl, axisSel, h("label", {}, logBox, " log scale"), resetBtn,
    h("a", { href: "#/" }, "← runs")),
    h("div", { class: "grid" }, h("div", {}, h("div", { class: "card" }, chartsEl), below), side));

  const groupSeries = (g) => Object.values(data.series).filter(s => g[2](s.name)
    && !(s.scope === "EPOCH" && data.series[`STEP/${s.name}`]));  // epoch LR duplicates the step LR
  function markers() {
    let row = 0;
    return controls.filter(c => c.status === "APPLIED" && c.applied_step !== null).map(c => ({
      x: data.x(mode, c.applied_step, 0, "STEP"), step: c.applied_step, row: (row++) % 3,
      label: `${c.kind} ${fmt(c.value)}${c.source === "CONSOLE" ? " (console)" : ""}`,
      color: c.source === "SCHEDULED" ? "#1f8a4c" : "#c62f2f" }));
  }
  function partsOf(g) {
    return groupSeries(g).map(s => {
      const xs = [], ys = [];
      for (let i = 0; i < s.steps.length; i++) {
        const x = data.x(mode, s.steps[i], s.epochs[i], s.scope);
        if (x === null || (xs.length && x < xs[xs.length - 1])) continue;
        if (xs.length && x === xs[xs.length - 1]) { ys[ys.length - 1] = s.values[i]; continue; }
        xs.push(x); ys.push(logScale && !(s.values[i] > 0) ? null : s.values[i]);
      }
      return [xs, ys];
    });
  }
  function rebuild() {
    for (const c of Object.values(TC.charts)) c.destroy();
    TC.charts = {}; chartsEl.replaceChildren();
    const xLabel = { step: "step", epoch: "epoch", wall: "seconds since start" }[mode];
    for (const g of GROUPS) {
      const ss = groupSeries(g);
      if (!ss.length) continue;
      const el = h("div", { class: "chart", id: `chart-${g[0]}` });
      chartsEl.append(el);
      const labels = ss.map(s => s.scope === "EPOCH" ? `${s.name} (epoch)` : s.name);
      const u = makeChart(el, g[1], labels, COLORS, { mode, log: logScale, xLabel }, markers);
      u.__group = g; u.__n = ss.length;
      u.hooks = u.hooks || {};
      TC.charts[g[0]] = u;
      el.addEventListener("mouseup", () => { setTimeout(() => { zoomed = u.scales.x.min > (u.data[0][0] ?? 0) ||
        u.scales.x.max < (u.data[0][u.data[0].length - 1] ?? 0); }, 0); });
      el.addEventListener("dblclick", () => { zoomed = false; });
    }
    if (!Object.keys(TC.charts).length) chartsEl.append(h("p", { class: "muted", id: "no-data" }, "No metrics yet."));
    redraw();
  }
  function redraw() {
    pendingDraw = false;
    let total = 0;
    if (GROUPS.filter(g => groupSeries(g).length).length !== Object.keys(TC.charts).length) { rebuild(); return; }
    for (const [key, u] of Object.entries(TC.charts)) {
      if (groupSeries(u.__group).length !== u.__n) { rebuild(); return; }  // a new series appeared
      const d = alignedData(partsOf(u.__group));
      u.setData(d, !zoomed);
      const el = u.root.parentElement;
      el.dataset.points = d.length > 1 ? d.slice(1).reduce((n, ys) => n + ys.filter(v => v !== null).length, 0) : 0;
      total += +el.dataset.points;
    }
    const mk = markers();
    TC.markers = mk.map(m => ({ label: m.label, step: m.step }));
    chartsEl.dataset.markers = mk.map(m => `${m.label}@${m.step}`).join(";");
    chartsEl.dataset.points = total;
    chartsEl.dataset.lastStep = data.lastStep;
    const ls = $("#last-step"); if (ls && data.lastStep >= 0) ls.textContent = data.lastStep;
    if (total > 0 && TC.firstDraw === undefined) { TC.firstDraw = performance.now(); mark("drawn"); }
    if (latestWall !== null) { TC.latencies.push(Date.now() / 1000 - latestWall); latestWall = null;
      if (TC.latencies.length > 10000) TC.latencies.splice(0, 5000); }
  }
  const schedule = () => { if (!pendingDraw) { pendingDraw = true; requestAnimationFrame(redraw); } };
  TC.run = { id, data, redraw: () => redraw() };

  // ---- side panels
  const steer = steeringPanel(id, () => exp);
  const tagsCard = h("div", { class: "card", id: "tags-card" });
  const summaryCard = h("div", { class: "card", id: "summary-card" });
  side.append(steer.el, tagsCard, summaryCard);
  const controlsCard = h("div", { class: "card", id: "controls-card" });
  const specCard = h("div", { class: "card", id: "spec-card" });
  below.append(controlsCard, specCard);

  function drawHeader() {
    title.textContent = `Run ${exp.id}: ${exp.name}`;
    stateEl.replaceChildren(h("span", { class: `state state-${exp.state}` }, exp.state),
      h("span", { class: "muted", id: "run-message" }, exp.message ? " " + exp.message : ""));
    steer.setState(exp.state);
    drawTags(tagsCard, exp, (x) => { exp = { ...exp, ...x }; drawHeader(); });
    summaryCard.replaceChildren(h("h3", {}, "Summary"), h("table", { class: "kv" },
      h("tr", {}, h("td", {}, "attempt"), h("td", {}, exp.attempt)),
      h("tr", {}, h("td", {}, "worker"), h("td", {}, exp.worker_id || "—")),
      h("tr", {}, h("td", {}, "last step"), h("td", { id: "last-step" }, data.lastStep >= 0 ? data.lastStep : exp.last_step)),
      ...Object.entries(exp.summary).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, fmt(v))))));
  }
  function drawControls() {
    controlsCard.replaceChildren(h("h3", {}, "Control log"), controls.length ? h("table", { id: "control-log" },
      h("tr", {}, ["kind", "value", "source", "status", "applied at", "old → new", "message"].map(t => h("th", {}, t))),
      controls.map(c => h("tr", { "data-command": c.command_id }, h("td", {}, c.kind), h("td", {}, fmt(c.value)),
        h("td", {}, c.source), h("td", {}, c.status), h("td", {}, c.applied_step ?? (c.at_step !== null ? `@${c.at_step}` : "—")),
        h("td", {}, c.old_value !== null ? `${fmt(c.old_value)} → ${fmt(c.new_value)}` : "—"),
        h("td", {}, c.consequence || c.message || "")))) : h("p", { class: "muted" }, "No control commands."));
  }
  function addControl(c) {
    const i = controls.findIndex(x => x.command_id === c.command_id);
    if (i >= 0) controls[i] = c; else controls.push(c);
    steer.resolved(c); drawControls(); schedule();
  }

  const onMessage = (msg) => {
    switch (msg.t) {
      case "experiment":
        mark("experiment");
        exp = msg.experiment; controls = msg.controls; drawHeader(); drawControls();
        specCard.replaceChildren(h("h3", {}, "Spec"), h("pre", { id: "spec" }, JSON.stringify(exp.spec, null, 2)));
        break;
      case "history": {
        mark("history");
        for (const [scope, byName] of Object.entries(msg.series))
          for (const [name, s] of Object.entries(byName))
            for (let i = 0; i < s.steps.length; i++) data.add(scope, name, s.steps[i], s.epochs[i], s.values[i]);
        for (const [step, wall] of msg.wall) data.addWall(step, wall);
        data.lastStep = msg.last.STEP;
        rebuild();
        break;
      }
      case "metrics": {
        const n = msg.names.length;
        for (const r of msg.rows) {
          for (let i = 0; i < n; i++) if (r[3 + i] !== null) data.add(msg.scope, msg.names[i], r[0], r[1], r[3 + i]);
          if (msg.scope === "STEP") { data.addWall(r[0], r[2]); data.lastStep = Math.max(data.lastStep, r[0]); }
        }
        // Latency is measured from the oldest row not yet drawn (the worst case).
        if (msg.scope === "STEP" && msg.rows.length && latestWall === null) latestWall = msg.rows[0][2];
        schedule();
        break;
      }
      case "control": addControl(msg.control); break;
      case "state": exp = { ...exp, ...msg.experiment }; drawHeader(); break;
      case "overflow": banner(msg.message); break;
    }
  };
  for (;;) {
    let ended = false;
    try {
      const started = early;
      early = null;  // a reconnect asks again
      await stream(`/api/experiments/${id}/stream?points=2000`, (msg) => { if (msg.t === "end") ended = true; onMessage(msg); },
                   signal, started);
    } catch (err) { if (err.name === "AbortError" || err instanceof ApiError) throw err; }
    if (ended || signal.aborted) { setConn(ended ? "" : "down"); return; }
    setConn("down");
    await new Promise(r => setTimeout(r, 1500));  // the server restarted or cut us off: reload the page's data
    if (signal.aborted) return;
    Object.assign(data, new RunData());
  }
}

function steeringPanel(id, getExp) {
  const kinds = TC.config.control_kinds;
  const kind = h("select", { id: "steer-kind" }, kinds.map(k => h("option", { value: k }, k)));
  const value = h("input", { id: "steer-value", type: "number", step: "any", placeholder: "value", size: 10 });
  const hold = h("input", { id: "steer-hold", type: "checkbox" });
  const answer = h("div", { id: "steer-answer", class: "answer", hidden: true });
  const preview = h("button", { id: "steer-preview", onclick: () => send(true) }, "Preview");
  const apply = h("button", { id: "steer-apply", class: "primary", onclick: () => send(false) }, "Apply");
  const cancel = h("button", { id: "cancel-run", class: "danger", onclick: async () => {
    if (!confirm(`Cancel run ${id}?`)) return;
    try { await api(`/api/experiments/${id}/cancel`, { reason: "cancelled from the console" }); }
    catch (err) { show("bad", err.message); }
  } }, "Cancel run");
  let waiting = null;
  function show(cls, text) { answer.className = `answer ${cls}`; answer.textContent = text; answer.hidden = false; }
  function line(r) {
    if (r.status === "APPLIED") return `${r.kind} ${fmt(r.value)} applied at step ${r.applied_step}: `
      + `${fmt(r.old_value)} → ${fmt(r.new_value)}${r.consequence ? "\n" + r.consequence : ""}`;
    if (r.status === "PENDING") return `${r.kind} ${fmt(r.value)} sent, waiting for the worker's ack`
      + (r.consequence ? "\n" + r.consequence : "");
    return `${r.kind} ${fmt(r.value)} ${r.status}${r.message ? ": " + r.message : ""}`;
  }
  async function send(dry) {
    const v = parseFloat(value.value);
    if (!Number.isFinite(v)) { show("bad", "value: enter a number"); return; }
    preview.disabled = apply.disabled = true;
    try {
      const r = await api(`/api/experiments/${id}/control`, { kind: kind.value, value: v, dry_run: dry,
        hold: hold.checked });
      if (dry) show("", `dry run: ${r.consequence || "would " + r.kind + " " + fmt(r.value)}`);
      else { waiting = r.status === "PENDING" ? r.command_id : null;
        show(r.status === "APPLIED" ? "ok" : r.status === "PENDING" ? "pending" : "bad", line(r)); }
    } catch (err) { show("bad", err.message); }
    finally { preview.disabled = apply.disabled = false; }
  }
  const el = h("div", { class: "card", id: "steer" }, h("h3", {}, "Steer"),
    h("div", { class: "toolbar" }, kind, value),
    h("div", { class: "toolbar" }, h("label", { title: "SET_LR/SCALE_LR: pin the LR instead of keeping the schedule's shape" },
      hold, " hold"), preview, apply),
    answer, h("div", { class: "toolbar", style: "margin-top:10px" }, cancel));
  return {
    el,
    setState(state) { const off = FINAL.has(state); preview.disabled = apply.disabled = cancel.disabled = off; },
    resolved(c) { if (waiting && c.command_id === waiting && c.status !== "PENDING") {
      waiting = null; show(c.status === "APPLIED" ? "ok" : "bad", line(c)); } },
  };
}

function drawTags(card, exp, update) {
  const input = h("input", { id: "tag-input", placeholder: "add tag", size: 12 });
  const note = h("textarea", { id: "note-input", rows: 3, style: "width:100%" });
  note.value = exp.note || "";
  const msg = h("span", { class: "muted", id: "annotate-msg" });
  const call = async (body) => {
    try { update(await api(`/api/experiments/${exp.id}/annotate`, body)); }
    catch (err) { msg.textContent = err.message; }
  };
  card.replaceChildren(h("h3", {}, "Tags and note"),
    h("div", { id: "tags" }, exp.tags.map(t => h("span", { class: "tag" }, t,
      h("button", { title: `remove ${t}`, onclick: () => call({ remove_tags: [t] }) }, "×")))),
    h("form", { class: "toolbar", style: "margin-top:6px", onsubmit: (e) => { e.preventDefault();
      if (input.value.trim()) call({ add_tags: [input.value.trim()] }); } }, input, h("button", {}, "Add")),
    note, h("div", { class: "toolbar" }, h("button", { id: "note-save", onclick: () => call({ note: note.value }) }, "Save note"), msg));
}

