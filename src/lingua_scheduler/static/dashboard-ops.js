// lingua-scheduler dashboard, the operator's panels: chart window up to an hour, the cluster,
// tenants, a node's detail and a job lookup. Loaded after dashboard.js, whose helpers ($, el, setText,
// fmtNum, fmtSeconds, fmtTime, showMsg, state) it uses. Everything comes from the read API on
// demand or every few seconds; strings from the server are inserted as text, never as HTML.
"use strict";

const OPS_REFRESH_MS = 5000;
const ops = { window: 60, series: null, clusterShown: false, nodeId: null };

// --- chart window ------------------------------------------------------------------------------

// Called by render(): the hour ring's points when the window is longer than the frame's minute.
function longSeries() {
  return ops.window > 60 && ops.series ? ops.series : null;
}

async function loadSeries() {
  if (ops.window <= 60) { ops.series = null; return; }
  try {
    const r = await fetch(`/api/v1/stats/series?window=${ops.window}`, { cache: "no-store" });
    if (r.ok) ops.series = await r.json();
  } catch (e) { /* the next refresh tries again */ }
}

function windowLabel(seconds) {
  return seconds >= 3600 ? "last hour" : seconds > 60 ? `last ${seconds / 60} min` : "last minute";
}

// --- cluster (multi-instance mode) --------------------------------------------------------------

async function loadCluster() {
  const frame = state.lastFrame;
  if (!frame || !frame.cluster) return;  // embedded mode: no cluster panel
  let body;
  try {
    const r = await fetch("/api/v1/cluster", { cache: "no-store" });
    body = await r.json();
    if (!r.ok) { setText("cluster-summary", `${body.code}: ${body.message}`); return; }
  } catch (e) { return; }
  $("cluster").hidden = false;
  const t = body.totals || {};
  setText("cluster-summary", `${body.instances.length} instances · store ${body.store.status}` +
    (body.store.round_trip_seconds !== null ? ` (${fmtSeconds(body.store.round_trip_seconds)} round trip)` : "") +
    ` · ${fmtNum(t.sessions)} sessions · ${fmtNum(t.heartbeats_per_second, 1)} heartbeats / s in all`);
  const rows = body.instances.map((i) => {
    const tr = el("tr");
    tr.dataset.instanceId = i.instance_id;
    tr.append(el("td", i.instance_id + (i.self ? " (this one)" : "")), el("td", i.address || "–"),
              el("td", fmtSeconds(i.presence_age_seconds), "num"), el("td", fmtNum(i.nodes_total), "num"),
              el("td", i.nodes ? fmtNum(i.nodes.ready) : "–", "num"), el("td", fmtNum(i.sessions), "num"),
              el("td", fmtNum(i.jobs_inflight), "num"), el("td", fmtNum(i.heartbeats_per_second, 1), "num"),
              el("td", fmtNum(i.inbox_depth), "num"),
              el("td", fmtNum(i.dead_letters), "num" + (i.dead_letters ? " bad" : "")));
    return tr;
  });
  $("cluster-body").replaceChildren(...rows);
}

// --- tenants -------------------------------------------------------------------------------------

async function loadTenants() {
  let body;
  try {
    const r = await fetch("/api/v1/tenants", { cache: "no-store" });
    if (!r.ok) return;
    body = await r.json();
  } catch (e) { return; }
  const rows = body.tenants.map((t) => {
    const tr = el("tr");
    tr.dataset.tenant = t.tenant_id === null ? "" : t.tenant_id;
    tr.append(el("td", t.tenant_id === null ? "(no tenant)" : t.tenant_id), el("td", fmtNum(t.sessions), "num"),
              el("td", fmtNum(t.sessions_elsewhere), "num"), el("td", fmtNum(t.jobs_per_second, 2), "num"),
              el("td", fmtNum(t.jobs_last_minute), "num"), el("td", body.metered ? "" : "not metered", "empty"));
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", "no sessions", "empty"); td.colSpan = 6; tr.append(td); rows.push(tr);
  }
  $("tenants-body").replaceChildren(...rows);
}

// --- node detail ---------------------------------------------------------------------------------

function list(id, items) {
  $(id).replaceChildren(...(items.length ? items : ["none"]).map((x) => el("li", x)));
}

async function openNode(nodeId) {
  ops.nodeId = nodeId;
  let node, jobs;
  try {
    const [r1, r2] = await Promise.all([
      fetch(`/api/v1/nodes/${encodeURIComponent(nodeId)}`, { cache: "no-store" }),
      fetch(`/api/v1/nodes/${encodeURIComponent(nodeId)}/jobs`, { cache: "no-store" }),
    ]);
    node = await r1.json();
    jobs = await r2.json();
    if (!r1.ok) { showMsg(`${node.code}: ${node.message}`, true); return; }
  } catch (e) { showMsg("cannot load node: " + e, true); return; }
  if (ops.nodeId !== nodeId) return;  // another node was opened meanwhile
  $("node-detail").hidden = false;
  setText("nd-id", node.node_id);
  const where = node.instance ? ` · on ${node.instance}` : "";
  setText("nd-summary", `${node.status}${node.connected ? "" : " · disconnected"} · v${node.version} · ` +
    `last heartbeat ${fmtSeconds(node.last_heartbeat_age_seconds)} ago${where}`);
  const ld = node.load;
  const load = [["jobs running", `${ld.effective_jobs} (reported ${ld.reported_running_jobs}, in flight ${ld.inflight_jobs})`],
                ["cpu", `${fmtNum(ld.cpu_percent)} %`], ["gpu", ld.gpu_percent === null ? "–" : `${fmtNum(ld.gpu_percent)} %`],
                ["memory", `${fmtNum(ld.mem_percent)} %`], ["gpus", node.gpus.join(", ") || "–"]];
  $("nd-load").replaceChildren(...load.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  list("nd-pools", node.pools);
  list("nd-services", node.services.installed.map((s) => s + (node.services.ready.includes(s) ? " (ready)" : " (not ready)")));
  list("nd-models", node.models.map((m) => `${m.model_id} · ${m.kind} · ${m.version}${m.enabled === false ? " (off)" : ""}`));
  $("nd-history").replaceChildren(...node.history.slice().reverse()
    .map((h) => el("li", `${fmtSeconds(h.age_seconds)} ago: ${h.event}`)));
  const outcomes = Object.entries(jobs.outcomes || {}).map(([k, n]) => `${k} ${n}`).join(" · ");
  setText("nd-outcomes", `${jobs.total || 0} held here (ended ones kept ${fmtNum(jobs.retention_seconds)} s)` +
    (outcomes ? ` · ${outcomes}` : ""));
  const rows = (jobs.jobs || []).map((j) => {
    const tr = el("tr");
    tr.dataset.jobId = j.job_id;
    const link = el("button", j.job_id, "link");
    link.type = "button";
    link.onclick = () => lookupJob(j.job_id);
    const td = el("td"); td.append(link);
    tr.append(td, el("td", j.state, "job-" + j.state), el("td", `${j.src_lang}->${j.tgt_lang}`),
              el("td", fmtNum(j.attempt), "num"), el("td", fmtSeconds(j.age_seconds) + " ago", "num"),
              el("td", fmtSeconds(j.duration_seconds), "num"), el("td", j.error_code || ""));
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr"); const td = el("td", "no recent jobs", "empty"); td.colSpan = 7; tr.append(td); rows.push(tr);
  }
  $("nd-jobs").replaceChildren(...rows);
}

// --- job lookup ----------------------------------------------------------------------------------

async function lookupJob(jobId) {
  jobId = (jobId || "").trim();
  if (!jobId) return;
  $("job-id").value = jobId;
  $("job-lookup").hidden = false;
  setText("job-title", jobId);
  const out = $("job-result");
  let body, r;
  try {
    r = await fetch(`/api/v1/jobs/${encodeURIComponent(jobId)}`, { cache: "no-store" });
    body = await r.json();
  } catch (e) { out.replaceChildren(el("p", "cannot look up the job: " + e, "msg bad")); return; }
  if (!r.ok) { out.replaceChildren(el("p", `${body.code}: ${body.message}`, "msg bad")); return; }
  const a = body.age_seconds;
  const facts = [["state", body.state], ["pair", `${body.src_lang}->${body.tgt_lang}`],
                 ["node", body.node_id || "–"], ["attempt", body.attempt], ["tried nodes", body.tried_nodes.join(", ") || "–"],
                 ["audio", `${fmtNum(body.audio_ms)} ms`], ["error", body.error_code || "–"],
                 ["created", `${fmtSeconds(a.created)} ago`], ["finished", a.finished === null ? "not yet" : `${fmtSeconds(a.finished)} ago`]];
  const dl = el("dl", null, "facts");
  dl.id = "job-facts";
  dl.append(...facts.flatMap(([k, v]) => { const dd = el("dd", v); dd.dataset.key = k; return [el("dt", k), dd]; }));
  const ol = el("ol");
  ol.append(...body.history.map((h) => el("li",
    `${fmtSeconds(h.age_seconds)} ago: ${h.from || "·"} → ${h.to} (${h.reason}${h.node_id ? " @ " + h.node_id : ""})`)));
  out.replaceChildren(dl, ol);
}

// --- wiring --------------------------------------------------------------------------------------

function refreshOps() {
  if (document.hidden) return;
  loadSeries();
  loadCluster();
  loadTenants();
  if (ops.nodeId && !$("node-detail").hidden) openNode(ops.nodeId);
}

function initOps() {
  $("window").onchange = async () => {
    ops.window = Number($("window").value);
    for (const e of document.querySelectorAll(".window-label")) e.textContent = windowLabel(ops.window);
    await loadSeries();
    if (state.lastFrame) render(state.lastFrame);
  };
  $("job-go").onclick = () => lookupJob($("job-id").value);
  $("job-id").onkeydown = (ev) => { if (ev.key === "Enter") lookupJob($("job-id").value); };
  $("job-close").onclick = () => { $("job-lookup").hidden = true; };
  $("nd-close").onclick = () => { $("node-detail").hidden = true; ops.nodeId = null; };
  // the node table is rebuilt every few seconds: one listener on its body, not one per row
  $("nodes-body").addEventListener("click", (ev) => {
    const cell = ev.target.closest("td.node-id");
    if (cell) openNode(cell.parentElement.dataset.nodeId);
  });
  setTimeout(refreshOps, 300);  // after the first frame says which mode this is
  setInterval(refreshOps, OPS_REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", initOps);
