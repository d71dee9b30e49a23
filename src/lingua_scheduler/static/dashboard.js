// lingua-scheduler dashboard. Hand-written, no dependencies, no build step.
//
// Live numbers come from one server-sent event stream (/api/v1/dashboard/stream): a frame a second
// holding the server-side aggregate (counts, rates, last-minute latencies, language pairs, recent
// events), never the fleet. Individual nodes are fetched from the read API only for the page of the
// node table in view. Admin actions carry the token typed by the operator (session storage of this
// tab only). Every string that comes from the server is inserted as text, never as HTML.
"use strict";

const STATUSES = ["ready", "registering", "degraded", "draining", "offline"];
const LATENCIES = ["heartbeat_handle", "selection", "dispatch", "end_to_end"];
const PAGE_SIZE = 20;
const NODE_REFRESH_MS = 5000;
const css = getComputedStyle(document.documentElement);
const color = (name) => css.getPropertyValue("--" + name).trim();

const $ = (id) => document.getElementById(id);
const state = { offset: 0, total: 0, token: sessionStorage.getItem("lingua-admin-token") || "",
                adminEnabled: false, adminValid: false, checked: false, lastFrame: null };

// --- formatting --------------------------------------------------------------------------------

function fmtNum(x, digits = 0) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1e-3) return (s * 1e6).toFixed(s < 1e-4 ? 1 : 0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(s < 1e-2 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}
function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(s)}s`;
}
function fmtTime(ms) {
  return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function setText(id, text) {
  const e = $(id);
  if (e && e.textContent !== String(text)) e.textContent = String(text);
}

// --- charts (canvas, drawn by hand) ---------------------------------------------------------------

// Draw lines of `series` ([{values, color, label}]) over the time axis `t` (ms). `log` gives a
// log-scale y axis (latencies span microseconds to seconds); `fmt` formats the axis labels.
function drawChart(canvas, t, series, { log = false, fmt = (v) => fmtNum(v, 1) } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || canvas.width, cssH = Math.round(cssW * canvas.height / canvas.width);
  if (canvas.width !== Math.round(cssW * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
    canvas.dataset.h = cssH;
  }
  const W = canvas.width / dpr, H = canvas.height / dpr;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const pad = { l: 52, r: 8, t: 8, b: 18 };
  const pw = W - pad.l - pad.r, ph = H - pad.t - pad.b;

  let values = [];
  for (const s of series) for (const v of s.values) if (v !== null && v !== undefined && (!log || v > 0)) values.push(v);
  let lo, hi;
  if (log) {
    lo = values.length ? Math.pow(10, Math.floor(Math.log10(Math.min(...values)))) : 1e-5;
    hi = values.length ? Math.pow(10, Math.ceil(Math.log10(Math.max(...values)))) : 1;
    if (hi <= lo) hi = lo * 10;
  } else {
    lo = 0;
    hi = values.length ? Math.max(...values) : 1;
    hi = hi <= 0 ? 1 : niceCeil(hi * 1.1);
  }
  const y = (v) => {
    const f = log ? (Math.log10(v) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)) : (v - lo) / (hi - lo);
    return pad.t + ph * (1 - f);
  };
  const n = t.length;
  const x = (i) => pad.l + (n <= 1 ? pw : pw * i / (n - 1));

  // grid and y labels
  ctx.strokeStyle = color("line");
  ctx.fillStyle = color("dim");
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const ticks = [];
  if (log) for (let v = lo; v <= hi * 1.0001; v *= 10) ticks.push(v);
  else for (let i = 0; i <= 4; i++) ticks.push(lo + (hi - lo) * i / 4);
  for (const v of ticks) {
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(W - pad.r, yy); ctx.stroke();
    ctx.fillText(fmt(v), pad.l - 4, yy);
  }
  // x labels: the first and the last second shown
  ctx.textBaseline = "top";
  if (n) {
    ctx.textAlign = "left"; ctx.fillText(fmtTime(t[0]), pad.l, H - pad.b + 4);
    ctx.textAlign = "right"; ctx.fillText(fmtTime(t[n - 1]), W - pad.r, H - pad.b + 4);
  } else {
    ctx.textAlign = "center"; ctx.fillText("waiting for data…", pad.l + pw / 2, pad.t + ph / 2);
  }
  // lines; a gap (null: no sample in that second) breaks the line, a lone point is drawn as a dot
  const has = (v) => v !== null && v !== undefined && (!log || v > 0);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (!has(v)) { pen = false; return; }
      const px = x(i), py = y(Math.min(Math.max(v, lo), hi));
      if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      pen = true;
    });
    ctx.stroke();
    s.values.forEach((v, i) => {
      if (has(v) && !has(s.values[i - 1]) && !has(s.values[i + 1])) {
        ctx.beginPath();
        ctx.arc(x(i), y(Math.min(Math.max(v, lo), hi)), 2.2, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
  }
}
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// --- rendering a frame -------------------------------------------------------------------------

function render(f) {
  state.lastFrame = f;
  state.adminEnabled = !!f.admin_enabled;
  if (!state.checked) { state.checked = true; checkToken(); }  // admin_enabled is known from here on
  setText("updated", fmtTime(f.computed_at_ms));
  setText("uptime", fmtDuration(f.instance && f.instance.uptime_seconds));
  setText("view-version", f.fleet_view ? f.fleet_view.version : "–");
  setText("view-age", f.fleet_view ? fmtSeconds(f.fleet_view.age_seconds) : "–");
  setText("loop-lag", fmtSeconds(f.event_loop_lag_seconds));
  setText("pool-mode", f.pools ? `${f.pools.mode} · ${f.pools.groups} groups` : "–");

  setText("fleet-total", fmtNum(f.nodes_total));
  for (const s of STATUSES) setText("status-" + s, fmtNum(f.nodes[s]));
  setText("nodes-ejected", fmtNum(f.nodes_ejected));
  setText("sessions", fmtNum(f.sessions));
  setText("jobs-inflight", fmtNum(f.jobs_inflight));
  setText("jobs-waiting", fmtNum(f.jobs_waiting));
  setText("jobs-rate", fmtNum(f.jobs.per_second.created, 1));
  setText("total-created", fmtNum(f.totals.created));
  setText("hb-rate", fmtNum(f.heartbeats_per_second, 1));
  setText("rooms", f.rooms ? `${fmtNum(f.rooms.rooms)} · ${fmtNum(f.rooms.members)}` : "–");
  setText("fanout-rate", f.rooms ? fmtNum(f.rooms.fanout_jobs_per_second, 1) : "–");
  renderStatusBar(f);

  // a window longer than the frame's minute comes from the hour ring (dashboard-ops.js)
  const s = (typeof longSeries === "function" && longSeries()) || f.series;
  drawChart($("chart-jobs"), s.t, [
    { values: s.created_per_s, color: color("registering"), label: "created" },
    { values: s.completed_per_s, color: color("ready"), label: "completed" },
    { values: s.failed_per_s, color: color("bad"), label: "failed" },
    { values: s.failovers_per_s, color: color("degraded"), label: "failovers" },
  ]);
  renderLegend();
  for (const name of LATENCIES) {
    const lm = f.latency_last_minute[name];
    setText("lat-" + name, lm.count ? `${fmtSeconds(lm.p50)} / ${fmtSeconds(lm.p99)}` : "no samples");
    drawChart($("chart-" + name), s.t, [
      { values: s[name + "_p50"], color: color("p50") },
      { values: s[name + "_p99"], color: color("p99") },
    ], { log: true, fmt: fmtSeconds });
  }
  renderPairs(f);
  renderEvents(f.events);
  renderAdminState();
}

function renderStatusBar(f) {
  const bar = $("statusbar");
  bar.replaceChildren();
  const total = f.nodes_total || 0;
  if (!total) return;
  for (const s of STATUSES) {
    const n = f.nodes[s];
    if (!n) continue;
    const d = el("div");
    d.style.width = (100 * n / total) + "%";
    d.style.background = color(s);
    d.title = `${s}: ${n}`;
    bar.append(d);
  }
}

function renderLegend() {
  const lg = $("legend-jobs");
  if (lg.childElementCount) return;
  for (const [label, c] of [["created", "registering"], ["completed", "ready"], ["failed", "bad"], ["failovers", "degraded"]]) {
    const sw = el("span", null, "sw");
    sw.style.background = color(c);
    lg.append(sw, document.createTextNode(label));
  }
}

function renderPairs(f) {
  setText("pairs-count", f.language_pairs_total);
  const body = $("pairs-body");
  const rows = [];
  for (const p of f.language_pairs) {
    const tr = el("tr");
    tr.dataset.pair = p.pair;
    const sup = p.supply;
    const rate = p.demand.jobs_per_second;
    tr.append(el("td", p.pair), el("td", fmtNum(p.demand.sessions), "num"), el("td", fmtNum(rate, 2), "num"),
              el("td", sup ? fmtNum(sup.nodes) : "–", "num"), el("td", sup ? fmtNum(sup.ready) : "–", "num"),
              el("td", sup ? fmtNum(sup.slots) : "–", "num"));
    // use = demand (sessions) against supply (job slots): a crude saturation hint per pair
    const use = el("td");
    if (sup) {
      const ratio = sup.slots ? p.demand.sessions / sup.slots : (p.demand.sessions ? 1 : 0);
      const b = el("span", null, "bar" + (ratio >= 0.8 ? " hot" : ""));
      b.style.width = Math.max(2, Math.min(80, ratio * 80)) + "px";
      b.title = `${fmtNum(ratio * 100)} % of slots`;
      use.append(b);
    } else if (p.demand.sessions) {
      use.append(el("span", "no pool", "status offline"));
    }
    tr.append(use);
    rows.push(tr);
  }
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", "no language pairs yet", "empty"); td.colSpan = 7; tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function renderEvents(events) {
  const body = $("events-body");
  const rows = events.map((ev) => {
    const tr = el("tr");
    const who = ev.job_id ? `${ev.job_id}${ev.node_id ? " @ " + ev.node_id : ""}` : (ev.node_id || "");
    let detail;
    if (ev.kind === "failover") detail = `attempt ${ev.attempt} · ${ev.reason}`;
    else if (ev.kind === "job_failed") detail = `${ev.state} · ${ev.code}`;
    else if (ev.kind === "node_status") detail = `${ev.old} → ${ev.new} · ${ev.reason}`;
    else if (ev.kind === "admin") detail = `${ev.action} → ${ev.result} by ${ev.operator}`;
    else if (ev.kind === "node_quality") detail = `${ev.state} · ${ev.reason}${ev.ejection_ms ? " · " + fmtSeconds(ev.ejection_ms / 1000) : ""}`;
    else detail = "";
    tr.append(el("td", fmtTime(ev.at_ms)), el("td", ev.kind, "kind-" + ev.kind), el("td", who), el("td", detail));
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", "nothing went wrong recently", "empty"); td.colSpan = 4; tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// --- the live stream -----------------------------------------------------------------------------

function connect() {
  const es = new EventSource("/api/v1/dashboard/stream");
  const conn = $("conn");
  es.onopen = () => { conn.textContent = "live"; conn.className = "pill pill-ok"; };
  es.onmessage = (msg) => {
    try { render(JSON.parse(msg.data)); } catch (e) { console.error("bad frame", e); }
  };
  es.onerror = () => {
    // EventSource retries by itself (the server sets retry: 2000)
    conn.textContent = "reconnecting…"; conn.className = "pill pill-bad";
  };
}

// --- nodes and admin actions ---------------------------------------------------------------------

function nodeQuery() {
  const q = new URLSearchParams({ limit: PAGE_SIZE, offset: state.offset });
  const st = $("f-status").value, lang = $("f-language").value.trim(), pool = $("f-pool").value.trim();
  if (st) q.set("status", st);
  if (lang) q.set("language", lang);
  if (pool) q.set("pool", pool);
  return q;
}

let nodesInFlight = false;
async function loadNodes() {
  if (nodesInFlight) return;
  nodesInFlight = true;
  try {
    const r = await fetch("/api/v1/nodes?" + nodeQuery(), { cache: "no-store" });
    const body = await r.json();
    if (!r.ok) { showMsg(`${body.code}: ${body.message}`, true); return; }
    state.total = body.total;
    renderNodes(body);
  } catch (e) {
    showMsg("cannot load nodes: " + e, true);
  } finally {
    nodesInFlight = false;
  }
}

function renderNodes(body) {
  const first = body.total ? body.offset + 1 : 0, last = body.offset + body.nodes.length;
  setText("f-page", `${first}–${last} of ${body.total}`);
  setText("nodes-summary", `${fmtNum(body.total)} matching`);
  $("f-prev").disabled = body.offset === 0;
  $("f-next").disabled = body.next_offset === null;
  const canAct = state.adminEnabled && state.adminValid;
  const rows = body.nodes.map((n) => {
    const tr = el("tr");
    tr.dataset.nodeId = n.node_id;
    const langs = [...new Set([...n.languages.asr, ...n.languages.tts])].join(" ");
    const cpuGpu = `${fmtNum(n.load.cpu_percent)} % / ${n.load.gpu_percent === null ? "–" : fmtNum(n.load.gpu_percent) + " %"}`;
    // node quality: an ejected or probation node says so next to its status
    const st = n.quality_state && n.quality_state !== "healthy" ? `${n.status} · ${n.quality_state}` : n.status;
    tr.append(el("td", n.node_id, "node-id"), el("td", st, "status " + n.status + (st === n.status ? "" : " q-" + n.quality_state)),
              el("td", `${n.load.effective_jobs} jobs`, "num"), el("td", cpuGpu, "num"), el("td", langs),
              el("td", String(n.pools.length), "num"), el("td", fmtSeconds(n.last_heartbeat_age_seconds) + " ago", "num"));
    const actions = el("td");
    const drainBtn = el("button", n.drain_requested || n.status === "draining" ? "undrain" : "drain");
    drainBtn.type = "button";
    drainBtn.className = "act-drain";
    drainBtn.disabled = !canAct;
    drainBtn.title = canAct ? "" : "enter a valid admin token first";
    drainBtn.onclick = () => nodeAction(n.node_id, drainBtn.textContent);
    const discBtn = el("button", "disconnect", "act-disconnect danger");
    discBtn.type = "button";
    discBtn.disabled = !canAct || !n.connected;
    // a second click within 3 s confirms (no modal dialog: it would block the page)
    discBtn.onclick = () => {
      if (discBtn.dataset.armed) { nodeAction(n.node_id, "disconnect"); return; }
      discBtn.dataset.armed = "1"; discBtn.textContent = "confirm?";
      setTimeout(() => { delete discBtn.dataset.armed; discBtn.textContent = "disconnect"; }, 3000);
    };
    actions.append(drainBtn, document.createTextNode(" "), discBtn);
    tr.append(actions);
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", "no node matches", "empty"); td.colSpan = 8; tr.append(td);
    rows.push(tr);
  }
  $("nodes-body").replaceChildren(...rows);
}

async function nodeAction(nodeId, action) {
  showMsg(`${action} ${nodeId}…`);
  try {
    const r = await fetch(`/api/v1/admin/nodes/${encodeURIComponent(nodeId)}/${action}`, {
      method: "POST",
      headers: { Authorization: "Bearer " + state.token, "X-Operator": "dashboard" },
    });
    const body = await r.json();
    if (!r.ok) {
      showMsg(`${action} ${nodeId}: ${body.code}: ${body.message}`, true);
      if (r.status === 401) { state.adminValid = false; renderAdminState(); }
    } else {
      showMsg(`${action} ${nodeId}: now ${body.status}`);
    }
  } catch (e) {
    showMsg(`${action} ${nodeId} failed: ${e}`, true);
  }
  loadNodes();
}

function showMsg(text, bad = false) {
  const m = $("action-msg");
  m.textContent = text;
  m.className = "msg" + (bad ? " bad" : "");
}

async function checkToken() {
  if (!state.token) { state.adminValid = false; renderAdminState(); return; }
  try {
    const r = await fetch("/api/v1/admin/check", { headers: { Authorization: "Bearer " + state.token } });
    state.adminValid = r.ok;
    if (r.status === 403) state.adminEnabled = false;
  } catch (e) {
    state.adminValid = false;
  }
  renderAdminState();
  loadNodes();
}

function renderAdminState() {
  const pill = $("admin-state");
  let text, cls;
  if (!state.adminEnabled) { text = "admin: disabled on server"; cls = "pill-wait"; }
  else if (!state.token) { text = "admin: no token"; cls = "pill-wait"; }
  else if (state.adminValid) { text = "admin: ready"; cls = "pill-ok"; }
  else { text = "admin: token refused"; cls = "pill-bad"; }
  if (pill.textContent !== text) { pill.textContent = text; pill.className = "pill " + cls; }
}

function init() {
  $("admin-token").value = state.token;
  $("admin-save").onclick = () => {
    state.token = $("admin-token").value.trim();
    if (state.token) sessionStorage.setItem("lingua-admin-token", state.token);
    else sessionStorage.removeItem("lingua-admin-token");
    checkToken();
  };
  for (const id of ["f-status", "f-language", "f-pool"]) $(id).onchange = () => { state.offset = 0; loadNodes(); };
  $("f-prev").onclick = () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); loadNodes(); };
  $("f-next").onclick = () => { state.offset += PAGE_SIZE; loadNodes(); };
  connect();
  loadNodes();
  setInterval(() => { if (!document.hidden) loadNodes(); }, NODE_REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", init);
