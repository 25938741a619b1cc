// The Kiln console: pages over kiln serve's REST API (serving/console).
// Every figure on a page comes from the same endpoints any client uses,
// sent with the bearer token kept in this tab's sessionStorage; a 401
// shows the token form. No data is rendered as HTML: text goes into text
// nodes (el() below).
"use strict";

const TOKEN_KEY = "kiln.console.token";
const POLL_MS = 2000;

// Charts by name, for people poking at the page and for the browser test.
window.kilnCharts = {};

class AuthError extends Error {}

class APIError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// el builds an element: attrs (event handlers as on*), children as nodes
// or text.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// api calls the REST API: JSON in and out, the token as a bearer token.
async function api(path, opts = {}) {
  const headers = {};
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  let body;
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, { method: opts.method || "GET", headers, body, cache: "no-store" });
  let data = null;
  const text = await r.text();
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { error: text }; }
  }
  if (r.status === 401) throw new AuthError((data && data.error) || "this server needs a token");
  if (!r.ok) throw new APIError((data && data.error) || r.status + " " + r.statusText, r.status);
  return data;
}

// optional is api for an endpoint a server may not have (no registry, no
// Flight service, no rollouts): null when it answers 404 "no endpoint".
async function optional(path, opts) {
  try {
    return await api(path, opts);
  } catch (e) {
    if (e instanceof APIError && e.status === 404 && /no endpoint/.test(e.message)) return null;
    throw e;
  }
}

// ---------------------------------------------------------------- format

function fmtBytes(n) {
  if (n === undefined || n === null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + u[i];
}

function fmtNum(v, digits = 4) {
  if (v === undefined || v === null || v === "") return "";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}

function fmtTime(s) {
  if (!s) return "";
  const d = new Date(s);
  return isNaN(d) ? String(s) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || text) }, text);
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: /^(#|size|rows|bytes|requests|errors|value|p50 ms|p99 ms|batches|version|difference|candidate|production \(baseline\))$/i.test(h) ? "num" : "" }, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD") ? c : el("td", {}, c))))));
}

function num(v, digits) {
  return el("td", { class: "num" }, fmtNum(v, digits));
}

// ---------------------------------------------------------------- charts

const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];

function chartBox(name, title) {
  const box = el("div", { class: "chart", "data-chart": name }, el("div", { class: "title" }, title));
  return box;
}

// lineChart draws series over xs into box with uPlot and returns it;
// opts.time: xs are Unix seconds. The box's data-points says how many x
// values it plots.
function lineChart(box, name, xs, series, opts = {}) {
  box.setAttribute("data-points", String(xs.length));
  if (typeof uPlot === "undefined") {
    box.append(el("p", { class: "muted" }, "charts unavailable (this kiln was built without uPlot)"));
    return null;
  }
  const old = window.kilnCharts[name];
  if (old) old.destroy();
  const u = new uPlot({
    width: opts.width || 560,
    height: opts.height || 240,
    scales: { x: { time: !!opts.time } },
    axes: [{ label: opts.xLabel || "" }, { label: opts.yLabel || "" }],
    series: [{ label: opts.xLabel || "x" }].concat(series.map((s, i) => ({
      label: s.label, stroke: s.color || PALETTE[i % PALETTE.length], width: 2,
      points: { show: true, size: 6 }, spanGaps: true,
    }))),
  }, [xs].concat(series.map((s) => s.values)), box);
  window.kilnCharts[name] = u;
  return u;
}

// barChart draws one value per named bar.
function barChart(box, name, names, values, label, color) {
  box.setAttribute("data-points", String(values.length));
  if (typeof uPlot === "undefined") {
    box.append(el("p", { class: "muted" }, "charts unavailable (this kiln was built without uPlot)"));
    return null;
  }
  const xs = names.map((_, i) => i);
  const u = new uPlot({
    width: 380,
    height: 220,
    scales: { x: { time: false, range: [-0.5, names.length - 0.5] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: [{ splits: () => xs, values: (u, splits) => splits.map((i) => names[i] ?? "") }, { label: label }],
    legend: { show: false },
    series: [{}, { label: label, fill: color + "cc", stroke: color, paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } }],
  }, [xs, values], box);
  window.kilnCharts[name] = u;
  return u;
}

// ---------------------------------------------------------------- pages

let pollTimer = null;

function poll(fn) {
  if (pollTimer) clearTimeout(pollTimer);
  const tick = async () => {
    try {
      if (await fn() === false) return;
    } catch (e) {
      showError(e);
      return;
    }
    pollTimer = setTimeout(tick, POLL_MS);
  };
  pollTimer = setTimeout(tick, POLL_MS);
}

function main() {
  return document.getElementById("main");
}

function setMain(...nodes) {
  main().replaceChildren(...nodes.flat(Infinity).filter((n) => n !== "" && n !== null && n !== undefined));
}

function showError(e) {
  if (pollTimer) clearTimeout(pollTimer);
  if (e instanceof AuthError) {
    tokenForm(e.message);
    return;
  }
  setMain(el("div", { class: "card" }, el("p", { class: "error", id: "page-error" }, String(e.message || e))));
}

function tokenForm(message) {
  const input = el("input", { type: "password", id: "token", name: "token", autocomplete: "off", placeholder: "bearer token" });
  const form = el("form", { class: "token card", id: "token-form", onsubmit: (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    render();
  } },
  el("h1", {}, "This server needs a token"),
  el("p", { class: "muted" }, message, ". The console sends it as Authorization: Bearer to the REST API and keeps it in this tab only (sessionStorage)."),
  input,
  el("button", { type: "submit", class: "primary", id: "token-submit" }, "Use token"));
  setMain(form);
  input.focus();
  renderTokenState();
}

function renderTokenState() {
  const s = document.getElementById("token-state");
  if (!s) return;
  if (token()) {
    s.replaceChildren("token set", el("button", { onclick: () => { sessionStorage.removeItem(TOKEN_KEY); render(); } }, "forget"));
  } else {
    s.replaceChildren();
  }
}

function noRegistry() {
  return el("div", { class: "card" }, el("p", { class: "muted" }, "This server runs without a model registry (kiln serve --registry DSN): no registered models, runs or evaluations to show."));
}

// registryModels returns every registered model with its versions, or null
// without a registry.
async function registryModels() {
  const list = await optional("/v2/registry/models");
  if (list === null) return null;
  return Promise.all(list.models.map(async (m) => {
    const d = await api("/v2/registry/models/" + encodeURIComponent(m.name));
    return { model: d.model, versions: d.versions };
  }));
}

// ---- Models

async function pageModels() {
  const [reg, index] = await Promise.all([registryModels(), api("/v2/repository/index", { method: "POST", body: {} })]);
  const served = {};
  for (const e of index || []) (served[e.name] = served[e.name] || []).push(e);
  const names = new Set(Object.keys(served));
  const byName = {};
  for (const m of reg || []) { byName[m.model.name] = m; names.add(m.model.name); }
  const cards = [...names].sort().map((name) => {
    const m = byName[name];
    const states = served[name] || [];
    const stateOf = (v) => {
      const e = states.find((s) => String(s.version) === String(v));
      return e ? badge(e.state) : el("span", { class: "muted" }, "not in repository");
    };
    const control = (action) => el("button", { class: action === "unload" ? "danger" : "primary", "data-action": action, "data-model": name,
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          await api("/v2/repository/models/" + encodeURIComponent(name) + "/" + action, { method: "POST", body: {} });
          render();
        } catch (e) { showError(e); }
      } }, action === "load" ? "Load" : "Unload");
    const config = el("details", { ontoggle: async (ev) => {
      const d = ev.target;
      if (!d.open || d.dataset.loaded) return;
      d.dataset.loaded = "1";
      try {
        const c = await api("/v2/models/" + encodeURIComponent(name) + "/config");
        d.append(el("pre", {}, JSON.stringify(c, null, 2)));
      } catch (e) {
        d.append(el("p", { class: "error" }, String(e.message)));
      }
    } }, el("summary", {}, "configuration"));
    const parts = [el("h2", {}, name, " ", m ? Object.entries(m.model.aliases || {}).map(([a, v]) => badge(a + " → v" + v, "alias")) : ""),
      el("p", {}, "Serving: ", states.length ? [states.map((s) => [badge(s.state), "v" + (s.version || "?"), s.reason ? " (" + s.reason + ") " : " "]), " ",
        control("load"), " ", control("unload")] : el("span", { class: "muted" }, "not in the served repository"))];
    if (m) {
      parts.push(table(["version", "aliases", "size", "digest", "created", "run", "parent", "status", "metrics"],
        m.versions.slice().reverse().map((v) => [
          el("td", { class: "num" }, "v" + v.version),
          (v.aliases || []).map((a) => badge(a, "alias")),
          el("td", { class: "num" }, fmtBytes(v.size)),
          el("code", {}, (v.digest || "").slice(0, 12)),
          fmtTime(v.created_at) + " by " + (v.created_by || "?"),
          v.run_id ? el("a", { href: "/runs/" + encodeURIComponent(v.run_id) }, v.run_id.slice(0, 8)) : "",
          v.parent ? "v" + v.parent.version : "",
          stateOf(v.version),
          Object.entries(((v.lineage || {}).metrics || {}).test || ((v.lineage || {}).metrics || {}).val || {}).map(([k, x]) => k + " " + fmtNum(x)).join(", "),
        ]), { class: "versions", "data-model": name }));
    }
    parts.push(config);
    return el("div", { class: "card model", "data-model": name }, parts);
  });
  setMain(el("h1", {}, "Models"), reg === null ? noRegistry() : "", cards.length ? cards : el("p", { class: "muted" }, "No models."));
}

// ---- Runs

async function pageRuns() {
  const d = await optional("/v2/registry/runs?limit=200");
  if (d === null) { setMain(el("h1", {}, "Runs"), noRegistry()); return; }
  const rows = d.runs.map((r) => [
    el("a", { href: "/runs/" + encodeURIComponent(r.run_id) }, r.run_id.slice(0, 12)),
    r.kind, r.model || "", badge(r.status), fmtTime(r.started_at),
    r.seconds ? fmtNum(r.seconds, 3) + " s" : "",
    Object.entries(r.metrics || {}).filter(([k]) => /^(val_|test_)/.test(k)).slice(0, 4).map(([k, v]) => k + " " + fmtNum(v)).join(", "),
  ]);
  setMain(el("h1", {}, "Runs"), rows.length ? table(["run", "kind", "model", "status", "started", "duration", "metrics"], rows, { id: "runs" }) : el("p", { class: "muted" }, "No runs recorded."));
  if (d.runs.some((r) => r.status === "running")) poll(async () => { await pageRuns(); return false; });
}

// metricSeries groups a run's metrics into charts: loss, validation
// metrics, learning rate; each series one value per step.
function metricSeries(metrics) {
  const steps = [...new Set(metrics.map((m) => m.step))].sort((a, b) => a - b);
  const byKey = {};
  for (const m of metrics) (byKey[m.key] = byKey[m.key] || {})[m.step] = m.value;
  const groups = { loss: [], metrics: [], lr: [] };
  for (const k of Object.keys(byKey).sort()) {
    const g = /(^|\.)loss$/.test(k) ? "loss" : (k === "lr" || /\.lr$/.test(k)) ? "lr" : "metrics";
    groups[g].push({ label: k, values: steps.map((s) => (s in byKey[k] ? byKey[k][s] : null)) });
  }
  return { steps, groups };
}

async function pageRun(id) {
  const d = await api("/v2/registry/runs/" + encodeURIComponent(id));
  const run = d.run;
  let versions = [];
  if (run.model) {
    const m = await optional("/v2/registry/models/" + encodeURIComponent(run.model)).catch(() => null);
    if (m) versions = m.versions;
  }
  const made = versions.filter((v) => v.run_id === run.run_id);
  const variants = versions.filter((v) => v.parent && made.some((p) => p.version === v.parent.version && p.model === v.parent.model));
  const params = run.params || {};
  const lin = made.length ? made[0].lineage || {} : {};
  const dataset = params.dataset || params["data.path"] || params["data.source"] || lin.data_source || "";
  const node = (title, ...body) => el("div", { class: "node" }, el("div", { class: "muted" }, title), ...body);
  const arrow = () => el("span", { class: "arrow" }, "→");
  const lineage = el("div", { class: "lineage", id: "lineage" },
    node("dataset", dataset ? (params.dataset ? el("a", { href: "/datasets" }, dataset) : dataset) : el("span", { class: "muted" }, "unknown"),
      lin.dataset_version ? el("div", { class: "muted" }, lin.dataset_version) : "",
      lin.data_sha256 ? el("div", { class: "muted" }, "sha256 " + lin.data_sha256.slice(0, 12)) : "",
      lin.rows ? el("div", { class: "muted" }, lin.rows + " rows") : ""),
    arrow(),
    node("run", run.kind + " " + run.run_id.slice(0, 8)),
    arrow(),
    node("version", made.length ? made.map((v) => el("div", {}, el("a", { href: "/models" }, v.model + " v" + v.version), " ", (v.aliases || []).map((a) => badge(a, "alias")))) : el("span", { class: "muted" }, run.status === "running" ? "not yet" : "none registered")),
    arrow(),
    node("optimized variants", variants.length ? variants.map((v) => el("div", {}, el("a", { href: "/optimizations" }, v.model + " v" + v.version))) : el("span", { class: "muted" }, "none")));

  const { steps, groups } = metricSeries(d.metrics);
  const charts = el("div", { class: "charts" });
  const titles = { loss: "Loss per epoch", metrics: "Validation metrics per epoch", lr: "Learning rate" };
  const pending = [];
  for (const g of ["loss", "metrics", "lr"]) {
    if (!groups[g].length) continue;
    const box = chartBox(g, titles[g]);
    charts.append(box);
    pending.push(() => lineChart(box, g, steps, groups[g], { xLabel: run.kind === "optimize" ? "variant" : "epoch", width: g === "lr" ? 380 : 560 }));
  }
  const finals = Object.entries(run.metrics || {}).sort();
  setMain(
    el("h1", {}, "Run ", el("code", {}, run.run_id), " ", badge(run.status)),
    el("p", { class: "muted" }, run.kind, run.model ? " of " + run.model : "", ", started ", fmtTime(run.started_at), run.seconds ? ", " + fmtNum(run.seconds, 3) + " s" : "", " by ", run.created_by || "?"),
    run.error ? el("p", { class: "error" }, run.error) : "",
    el("h2", {}, "Lineage"), lineage,
    el("h2", {}, "Curves"), steps.length ? charts : el("p", { class: "muted" }, "No metrics logged yet."),
    el("div", { class: "cols" },
      el("div", {}, el("h2", {}, "Hyper-parameters"), table(["parameter", "value"], Object.entries(params).sort().map(([k, v]) => [k, v]), { id: "params" })),
      el("div", {}, el("h2", {}, "Final metrics"), finals.length ? table(["metric", "value"], finals.map(([k, v]) => [k, num(v)]), { id: "final" }) : el("p", { class: "muted" }, run.status === "running" ? "Running…" : "None."))));
  for (const f of pending) f();
  if (run.status === "running") poll(async () => { await pageRun(id); return false; });
}

// ---- Evaluations

async function pageEvaluations() {
  const reg = await registryModels();
  if (reg === null) { setMain(el("h1", {}, "Evaluations"), noRegistry()); return; }
  const cards = [];
  for (const m of reg) {
    const evs = (await Promise.all(m.versions.map((v) => api("/v2/registry/models/" + encodeURIComponent(m.model.name) + "/versions/" + v.version))))
      .flatMap((d) => d.evaluations);
    evs.sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    for (const ev of evs) cards.push(evaluationCard(m.model, ev));
  }
  setMain(el("h1", {}, "Evaluations"), cards.length ? cards : el("p", { class: "muted" }, "No evaluations recorded."));
}

function evaluationCard(model, ev) {
  const e = ev.evidence || {};
  const cand = e.candidate || {};
  const base = e.baseline || {};
  const keys = [...new Set(Object.keys(cand.metrics || {}).concat(Object.keys(base.metrics || {})))].sort();
  const rows = keys.map((k) => [k === e.metric ? el("b", {}, k) : k, num((base.metrics || {})[k]), num((cand.metrics || {})[k]),
    num((cand.metrics || {})[k] !== undefined && (base.metrics || {})[k] !== undefined ? cand.metrics[k] - base.metrics[k] : undefined)]);
  if (cand.latency || base.latency) {
    rows.push(["latency p50 (ms)", num((base.latency || {}).p50_ms), num((cand.latency || {}).p50_ms), num(((cand.latency || {}).p50_ms || 0) - ((base.latency || {}).p50_ms || 0))]);
    rows.push(["latency p95 (ms)", num((base.latency || {}).p95_ms), num((cand.latency || {}).p95_ms), num(((cand.latency || {}).p95_ms || 0) - ((base.latency || {}).p95_ms || 0))]);
  }
  if (cand.model_bytes || base.model_bytes) rows.push(["model size", el("td", { class: "num" }, fmtBytes(base.model_bytes)), el("td", { class: "num" }, fmtBytes(cand.model_bytes)), ""]);
  let test = e.test || "";
  if (e.mcnemar) test += ": p = " + fmtNum(e.mcnemar.p_value, 3) + " (b " + e.mcnemar.b + ", c " + e.mcnemar.c + ")";
  if (e.interval) test += ": " + (e.interval.level * 100) + "% interval [" + fmtNum(e.interval.low) + ", " + fmtNum(e.interval.high) + "]";
  return el("div", { class: "card evaluation", "data-model": model.name, "data-version": ev.version },
    el("h2", {}, model.name, " v" + ev.version, " against ", base.ref || "production", " ", badge(ev.verdict)),
    el("p", {}, e.reason || ""),
    el("p", { class: "muted" }, "metric ", e.metric || "?", e.higher_is_better ? " (higher is better)" : " (lower is better)",
      ", improvement ", fmtNum(e.improvement), ", min margin ", fmtNum(e.min_margin), ", alpha ", fmtNum(e.alpha),
      ", ", e.significant ? "significant" : "not significant", (e.data && e.data.rows) ? ", " + e.data.rows + " holdout rows" : "",
      ", recorded ", fmtTime(ev.created_at), " by ", ev.created_by || "?"),
    el("p", {}, "Test: ", test || el("span", { class: "muted" }, "none")),
    table(["", "production (baseline)", "candidate", "difference"], rows),
    (e.warnings || []).map((w) => el("p", { class: "muted" }, "⚠ " + w)));
}

// ---- Rollouts

// Per model: what the page has polled (time in Unix seconds, per role).
const rolloutSeries = {};

function windowPoint(series, t, live) {
  if (!live) return;
  const last = series.t[series.t.length - 1];
  if (last !== undefined && t <= last) return;
  series.t.push(t);
  for (const role of ["production", "candidate"]) {
    const w = live[role] || {};
    series[role + "_err"].push(w.error_rate ?? null);
    series[role + "_p50"].push(w.p50_ms ?? null);
    series[role + "_p99"].push(w.p99_ms ?? null);
  }
  if (series.t.length > 600) for (const k of Object.keys(series)) series[k].shift();
}

function trackRollout(st) {
  let s = rolloutSeries[st.model];
  if (!s) {
    s = rolloutSeries[st.model] = { t: [], production_err: [], candidate_err: [], production_p50: [], production_p99: [], candidate_p50: [], candidate_p99: [] };
    for (const h of st.history || []) windowPoint(s, Date.parse(h.at) / 1000, h);
  }
  if (st.state === "running") windowPoint(s, Date.now() / 1000, st.live);
  return s;
}

function windowRow(role, w) {
  w = w || {};
  return [badge(role, role === "production" ? "alias" : "running"), w.version !== undefined ? "v" + w.version : "", num(w.requests), num(w.errors),
    el("td", { class: "num" }, w.error_rate !== undefined ? (w.error_rate * 100).toFixed(2) + " %" : ""), num(w.p50_ms, 3), num(w.p99_ms, 3)];
}

async function rolloutAction(model, action, body) {
  try {
    await api("/v2/rollouts/" + encodeURIComponent(model) + "/" + action, { method: "POST", body: body || {} });
    await pageRollouts();
  } catch (e) { showError(e); }
}

async function pageRollouts() {
  const d = await optional("/v2/rollouts");
  if (d === null) {
    setMain(el("h1", {}, "Rollouts"), el("div", { class: "card" }, el("p", { class: "muted" }, "This server has no rollout API (GET /v2/rollouts).")));
    return;
  }
  const cards = (d.rollouts || []).map((st) => {
    const s = trackRollout(st);
    const w = st.state === "running" ? st.weight || 0 : st.state === "promoted" ? 1 : 0;
    const running = st.state === "running";
    const charts = el("div", { class: "charts" });
    const errBox = chartBox("errors-" + st.model, "Error rate");
    const latBox = chartBox("latency-" + st.model, "Latency (ms)");
    charts.append(errBox, latBox);
    const card = el("div", { class: "card rollout", "data-model": st.model, "data-state": st.state },
      el("h2", {}, st.model, " ", badge(st.state), " production v" + st.production, " ← candidate v" + st.candidate),
      el("p", { class: "muted" }, "step ", (st.step ?? 0) + 1, " of ", (st.steps || []).length, " (", (st.steps || []).join("%, "), "%), window ", st.window || "",
        st.shadow ? ", shadow " + Math.round(st.shadow * 100) + " %" : "", ", started ", fmtTime(st.started_at), st.reason ? " — " + st.reason : ""),
      el("div", { class: "split", "data-weight": String(w) },
        el("div", { class: "prod", style: "flex:" + (1 - w) }, 1 - w > 0.08 ? "production v" + st.production + " " + Math.round((1 - w) * 100) + " %" : ""),
        el("div", { class: "cand", style: "flex:" + w }, w > 0.08 ? "candidate v" + st.candidate + " " + Math.round(w * 100) + " %" : "")),
      running ? el("p", {},
        el("button", { class: "danger", "data-action": "abort", onclick: () => rolloutAction(st.model, "abort") }, "Abort"), " ",
        el("button", { class: "primary", "data-action": "promote", onclick: () => rolloutAction(st.model, "promote") }, "Promote")) : "",
      st.live ? table(["role", "version", "requests", "errors", "error rate", "p50 ms", "p99 ms"],
        [windowRow("production", st.live.production), windowRow("candidate", st.live.candidate)]) : "",
      st.live && st.live.agreement !== undefined ? el("p", { class: "muted" }, "shadow agreement ", fmtNum(st.live.agreement, 3), " over ", st.live.shadowed || 0, " requests") : "",
      charts,
      (st.history || []).length ? el("details", {}, el("summary", {}, "steps (" + st.history.length + ")"),
        table(["at", "step", "weight", "verdict", "reason"], st.history.map((h) => [fmtTime(h.at), String(h.step + 1), Math.round(h.weight * 100) + " %", badge(h.verdict), h.reason || ""]))) : "");
    return { card, draw: () => {
      lineChart(errBox, "errors-" + st.model, s.t, [
        { label: "production", values: s.production_err, color: "#2563eb" },
        { label: "candidate", values: s.candidate_err, color: "#ea580c" }], { time: true, height: 200, width: 520 });
      lineChart(latBox, "latency-" + st.model, s.t, [
        { label: "production p50", values: s.production_p50, color: "#93c5fd" },
        { label: "production p99", values: s.production_p99, color: "#2563eb" },
        { label: "candidate p50", values: s.candidate_p50, color: "#fdba74" },
        { label: "candidate p99", values: s.candidate_p99, color: "#ea580c" }], { time: true, height: 200, width: 520 });
    } };
  });
  const models = await registryModels().catch(() => null);
  const start = models && models.length ? startForm(models) : "";
  setMain(el("h1", {}, "Rollouts"), cards.length ? cards.map((c) => c.card) : el("p", { class: "muted" }, "No rollouts."), start);
  for (const c of cards) c.draw();
  if ((d.rollouts || []).some((st) => st.state === "running")) poll(async () => { await pageRollouts(); return false; });
}

function startForm(models) {
  const model = el("select", { id: "rollout-model" }, models.map((m) => el("option", { value: m.model.name }, m.model.name)));
  const cand = el("input", { id: "rollout-candidate", type: "number", min: "1", placeholder: "version", style: "width:7em" });
  const steps = el("input", { id: "rollout-steps", placeholder: "5,25,50,100", style: "width:9em" });
  const windowIn = el("input", { id: "rollout-window", placeholder: "30s", style: "width:5em" });
  return el("div", { class: "card" }, el("h2", {}, "Start a rollout"),
    el("form", { onsubmit: (ev) => {
      ev.preventDefault();
      const body = { candidate: Number(cand.value) };
      if (steps.value.trim()) body.steps = steps.value.split(",").map((x) => Number(x.trim()));
      if (windowIn.value.trim()) body.window = windowIn.value.trim();
      rolloutAction(model.value, "start", body);
    } }, "model ", model, " candidate ", cand, " steps % ", steps, " window ", windowIn, " ", el("button", { type: "submit", class: "primary" }, "Start")));
}

// ---- Datasets

async function pageDatasets() {
  const d = await optional("/v2/datasets");
  if (d === null) {
    setMain(el("h1", {}, "Datasets"), el("div", { class: "card" }, el("p", { class: "muted" }, "This server has no Flight dataset store (its Flight port is off).")));
    return;
  }
  // Which registered versions were trained on each dataset: runs name it.
  const runs = await optional("/v2/registry/runs?limit=1000").catch(() => null);
  const reg = runs ? await registryModels() : null;
  const usedBy = {};
  if (runs && reg) {
    const runDataset = {};
    for (const r of runs.runs) if (r.params && r.params.dataset) runDataset[r.run_id] = r.params.dataset;
    for (const m of reg) for (const v of m.versions) {
      const ds = runDataset[v.run_id];
      if (ds) (usedBy[ds] = usedBy[ds] || []).push(v);
    }
  }
  const rows = d.datasets.map((ds) => [
    el("b", {}, ds.name), num(ds.rows), num(ds.batches), el("td", { class: "num" }, fmtBytes(ds.bytes)), fmtTime(ds.modified),
    el("details", {}, el("summary", {}, ds.schema.length + " columns"), table(["column", "type", "nullable"], ds.schema.map((f) => [f.name, el("code", {}, f.type), f.nullable ? "yes" : "no"]))),
    (usedBy[ds.name] || []).map((v) => el("div", {}, el("a", { href: "/runs/" + encodeURIComponent(v.run_id) }, v.model + " v" + v.version), " ", (v.lineage && v.lineage.dataset_version) || "")),
  ]);
  setMain(el("h1", {}, "Datasets"),
    el("p", { class: "muted" }, "Datasets stored by the Flight service (DoPut). A DoPut of the same name replaces the dataset: its version is its commit time; the versions trained on each are listed with their runs."),
    rows.length ? table(["name", "rows", "batches", "bytes", "committed", "schema", "versions trained on it"], rows, { id: "datasets" }) : el("p", { class: "muted" }, "No datasets."));
}

// ---- Optimization reports

async function pageOptimizations() {
  const reg = await registryModels();
  if (reg === null) { setMain(el("h1", {}, "Optimization reports"), noRegistry()); return; }
  const cards = [];
  const draws = [];
  for (const m of reg) for (const v of m.versions) {
    const opt = (v.lineage || {}).optimization;
    if (!opt || !opt.report || !(opt.report.variants || []).length) continue;
    const vs = opt.report.variants;
    const names = vs.map((x) => x.name);
    const key = m.model.name + "-v" + v.version;
    const metric = vs[0].metric || "metric";
    const boxes = [["size-" + key, "File size (KiB)", vs.map((x) => x.file_bytes / 1024), "KiB", "#2563eb"],
      ["accuracy-" + key, metric, vs.map((x) => x.value), metric, "#16a34a"],
      ["latency-" + key, "Latency, batch 1 (ms)", vs.map((x) => x.latency_ms_b1), "ms", "#ea580c"]];
    const charts = el("div", { class: "charts" });
    for (const [name, title, values, label, color] of boxes) {
      const box = chartBox(name, title);
      charts.append(box);
      draws.push(() => barChart(box, name, names, values, label, color));
    }
    cards.push(el("div", { class: "card optimization", "data-model": m.model.name, "data-version": v.version },
      el("h2", {}, m.model.name, " v" + v.version, v.parent ? " (optimized from v" + v.parent.version + ")" : "", " ", (v.aliases || []).map((a) => badge(a, "alias"))),
      el("p", { class: "muted" }, [opt.method, opt.quantize && "quantize " + opt.quantize, opt.engine && "engine " + opt.engine,
        opt.options && opt.options.prune ? "prune " + opt.options.prune : ""].filter(Boolean).join(", ")),
      charts,
      table(["variant", "size", "params", "sparsity", metric, "p50 b1 (ms)", "p50 b64 (ms)"],
        vs.map((x) => [x.name, el("td", { class: "num" }, fmtBytes(x.file_bytes)), num(x.params), num(x.sparsity, 3), num(x.value), num(x.latency_ms_b1, 3), num(x.latency_ms_b64, 3)]))));
  }
  setMain(el("h1", {}, "Optimization reports"), cards.length ? cards : el("p", { class: "muted" }, "No optimized versions registered (kiln optimize ... --register, or an optimize stage of a pipeline)."));
  for (const f of draws) f();
}

// ---------------------------------------------------------------- router

const routes = [
  [/^\/(models\/?)?$/, "models", pageModels],
  [/^\/runs\/?$/, "runs", pageRuns],
  [/^\/runs\/([^/]+)$/, "runs", pageRun],
  [/^\/evaluations\/?$/, "evaluations", pageEvaluations],
  [/^\/rollouts\/?$/, "rollouts", pageRollouts],
  [/^\/datasets\/?$/, "datasets", pageDatasets],
  [/^\/optimizations\/?$/, "optimizations", pageOptimizations],
];

async function render() {
  if (pollTimer) clearTimeout(pollTimer);
  renderTokenState();
  const path = location.pathname;
  for (const [re, nav, fn] of routes) {
    const m = path.match(re);
    if (!m) continue;
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.page === nav);
    try {
      await fn(...m.slice(1).filter((x) => x !== undefined && !x.startsWith("models")).map(decodeURIComponent));
      document.body.dataset.loaded = nav;
    } catch (e) {
      showError(e);
      document.body.dataset.loaded = e instanceof AuthError ? "token" : "error";
    }
    return;
  }
  setMain(el("p", { class: "error" }, "No console page at " + path));
}

render();
