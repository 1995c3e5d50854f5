// Charts (uPlot) shared by the run and compare pages, and the compare page.
// Loaded after console.js (uses its helpers at call time).
"use strict";

// ------------------------------------------------------------------ charts
// Series are kept per "SCOPE/name" as parallel arrays; a chart shows the series whose
// name matches its group, on a shared x (step, epoch or wall time), aligned with uPlot.join.
const GROUPS = [["lr", "Learning rate", n => /(^|_)lr($|_)/.test(n)],
                ["loss", "Loss", n => /loss/.test(n)],
                ["acc", "Accuracy", n => /acc|top1|top5/.test(n)]];

class RunData {
  constructor() { this.series = {}; this.wall = []; this.spe = null; this.t0 = null; this.lastStep = -1; }
  add(scope, name, step, epoch, value) {
    const k = `${scope}/${name}`;
    const s = this.series[k] || (this.series[k] = { scope, name, steps: [], epochs: [], values: [] });
    s.steps.push(step); s.epochs.push(epoch); s.values.push(value);
    if (s.steps.length > 60000) thin(s);
    if (scope === "STEP" && this.spe === null && epoch > 0 && s.epochs.length > 1 && s.epochs[s.epochs.length - 2] === epoch - 1)
      this.spe = step / epoch;
  }
  addWall(step, wall) {
    if (this.t0 === null || wall < this.t0) this.t0 = wall;
    const w = this.wall;
    if (!w.length || step > w[w.length - 1][0]) w.push([step, wall]);
    if (w.length > 20000) this.wall = w.filter((_, i) => i % 2 === 0 || i === w.length - 1);
  }
  wallAt(step) {  // interpolated from the anchors
    const w = this.wall; if (!w.length) return null;
    let lo = 0, hi = w.length - 1;
    if (step <= w[0][0]) return w[0][1]; if (step >= w[hi][0]) return w[hi][1];
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (w[mid][0] <= step) lo = mid; else hi = mid; }
    const [s0, t0] = w[lo], [s1, t1] = w[hi];
    return t0 + (t1 - t0) * (step - s0) / (s1 - s0);
  }
  x(mode, step, epoch, scope) {
    if (mode === "epoch") return this.spe ? step / this.spe : (scope === "EPOCH" ? epoch + 1 : epoch);
    if (mode === "wall") { const t = this.wallAt(step); return t === null ? null : t - this.t0; }
    return step;
  }
}

function thin(s) {  // keep every other point of the older half: bounded memory on long live views
  const half = s.steps.length >> 1;
  for (const key of ["steps", "epochs", "values"]) {
    const a = s[key]; s[key] = a.slice(0, half).filter((_, i) => i % 2 === 0).concat(a.slice(half));
  }
}

function markerPlugin(getMarkers) {
  return { hooks: { draw: [u => {
    const ctx = u.ctx, { top, height } = u.bbox;
    ctx.save(); ctx.font = `${11 * devicePixelRatio}px system-ui`; ctx.textBaseline = "top";
    for (const mk of getMarkers()) {
      if (mk.x === null || mk.x < u.scales.x.min || mk.x > u.scales.x.max) continue;
      const x = u.valToPos(mk.x, "x", true);
      ctx.strokeStyle = mk.color || "#c62f2f"; ctx.setLineDash([4, 3]); ctx.lineWidth = devicePixelRatio;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.fillStyle = mk.color || "#c62f2f"; ctx.fillText(mk.label, x + 3, top + 2 + (mk.row || 0) * 13 * devicePixelRatio);
    }
    ctx.restore();
  }] } };
}

function makeChart(el, title, labels, colors, opts, getMarkers) {
  const width = Math.max(320, el.clientWidth || 640);
  const series = [{ label: opts.xLabel }];
  labels.forEach((l, i) => series.push({ label: l, stroke: colors[i % colors.length], width: 1.5, spanGaps: true,
    points: { show: false } }));
  const stepIncrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6];
  const u = new uPlot({
    title, width, height: 210, series, plugins: [markerPlugin(getMarkers)],
    scales: { x: { time: false }, y: opts.log ? { distr: 3 } : {} },
    axes: [opts.mode === "step" ? { label: opts.xLabel, incrs: stepIncrs } : { label: opts.xLabel }, { size: 60 }],
    cursor: { sync: { key: "tc" }, drag: { x: true, y: false } },
    legend: { live: true },
  }, [[], ...labels.map(() => [])], el);
  return u;
}

function alignedData(parts) {  // parts: [[xs, ys], ...] each sorted by x
  if (!parts.length) return [[]];
  if (parts.length === 1) return [parts[0][0], parts[0][1]];
  return uPlot.join(parts.map(([x, y]) => [x, y]));
}

// ------------------------------------------------------------------ compare
async function compareView(view, ids, signal) {
  const runs = await Promise.all(ids.map(async id => {
    const [d, hist] = await Promise.all([api(`/api/experiments/${id}`, undefined, signal),
                                         api(`/api/experiments/${id}/history?points=2000`, undefined, signal)]);
    return { id, exp: d.experiment, controls: d.controls, hist };
  }));
  const names = [...new Set(runs.flatMap(r => Object.entries(r.hist.series)
    .flatMap(([scope, byName]) => Object.keys(byName).map(n => `${scope}/${n}`))))].sort();
  const pick = h("select", { id: "compare-metric", onchange: draw }, names.map(n => h("option", { value: n }, n)));
  const pref = ["STEP/loss", "EPOCH/val_top1", "STEP/lr"].find(n => names.includes(n));
  if (pref) pick.value = pref;
  const logBox = h("input", { type: "checkbox", onchange: draw });
  const chartEl = h("div", { class: "chart", id: "compare-chart" });
  view.append(h("div", { class: "toolbar" }, h("h2", {}, `Compare ${ids.join(", ")}`), pick,
    h("label", {}, logBox, " log scale"), h("a", { href: "#/" }, "← runs")),
    h("div", { class: "card" }, chartEl),
    h("div", { class: "card" }, h("table", { id: "compare-table" },
      h("tr", {}, ["", "run", "state", "last step", "val_top1", "best_val_top1", "train_loss", "controls", "tags"].map(t => h("th", {}, t))),
      runs.map((r, i) => h("tr", {}, h("td", {}, h("span", { style: `color:${COLORS[i % COLORS.length]}` }, "■")),
        h("td", {}, h("a", { href: `#/run/${r.id}` }, `${r.id} ${r.exp.name}`)),
        h("td", {}, h("span", { class: `state state-${r.exp.state}` }, r.exp.state)), h("td", {}, r.exp.last_step),
        h("td", {}, fmt(r.exp.summary.val_top1)), h("td", {}, fmt(r.exp.summary.best_val_top1)),
        h("td", {}, fmt(r.exp.summary.train_loss)),
        h("td", {}, r.controls.filter(c => c.status === "APPLIED").map(c => `${c.kind} ${fmt(c.value)}@${c.applied_step}`).join(", ") || "—"),
        h("td", {}, r.exp.tags.map(t => h("span", { class: "tag" }, t))))))));
  function draw() {
    for (const c of Object.values(TC.charts)) c.destroy();
    TC.charts = {}; chartEl.replaceChildren();
    const [scope, name] = pick.value.split(/\/(.*)/s);
    const parts = runs.map(r => { const s = (r.hist.series[scope] || {})[name];
      return s ? [s.steps, logBox.checked ? s.values.map(v => v > 0 ? v : null) : s.values] : [[], []]; });
    const mk = runs.flatMap((r, i) => r.controls.filter(c => c.status === "APPLIED" && c.applied_step !== null)
      .map(c => ({ x: c.applied_step, step: c.applied_step, row: i % 3, color: COLORS[i % COLORS.length],
                   label: `${r.id}: ${c.kind} ${fmt(c.value)}` })));
    const u = makeChart(chartEl, name, runs.map(r => `${r.id} ${r.exp.name}`), COLORS,
      { mode: "step", log: logBox.checked, xLabel: "step" }, () => mk);
    const nonEmpty = parts.filter(p => p[0].length);
    const d = nonEmpty.length ? uPlot.join(parts.map(([x, y]) => [x.length ? x : [0], x.length ? y : [null]])) : [[]];
    u.setData(d);
    TC.charts.compare = u;
    chartEl.dataset.series = parts.filter(p => p[0].length).length;
    chartEl.dataset.markers = mk.map(m => `${m.label}@${m.step}`).join(";");
  }
  draw();
}

