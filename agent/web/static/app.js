// vip-agent status page: polls /api/state, draws the overview, the datasets, the
// timeline and one dataset in detail. No framework, no outside resource (CSP: 'self').
"use strict";

const PHASE_COLORS = {
  waiting: "#b8c2cc", validate: "#8f9bb3", upload: "#3b82f6", queue: "#f59e0b",
  run: "#10b981", download: "#8b5cf6", cleanup: "#14b8a6",
};
const PHASE_ORDER = ["validate", "upload", "queue", "run", "download", "cleanup"];
const STATE_ORDER = ["failed", "incomplete", "paused", "uploading", "downloading", "running", "queued",
  "validating", "cleaning", "waiting", "cancelled", "done"];
const TOKEN_KEY = "vip-agent-token:" + location.host;

const S = { data: null, sort: { key: "id", dir: -1 }, detail: null, timeline: [], tick: 0,
  pendingAction: null, timer: null };

// -- small DOM helpers: text only, never HTML from data ------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else if (k === "title" || k === "href" || k === "id" || k === "colspan") el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const kid of kids.flat()) if (kid) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}
const $ = (sel) => document.querySelector(sel);
function fill(tbody, rows, empty) {
  if (!rows.length && empty) {
    const cols = tbody.parentElement.querySelectorAll("thead th").length || 1;
    rows = [h("tr", {}, h("td", { class: "muted", colspan: cols, text: empty }))];
  }
  tbody.replaceChildren(...rows);
}

// -- formatting ----------------------------------------------------------------------
function size(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0; let v = Number(n);
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}
function dur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 10) return Math.max(0, s).toFixed(1) + " s";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function ago(t) { return t ? dur(Date.now() / 1000 - t) : ""; }
function clock(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}
function badge(state) { return h("span", { class: "badge s-" + state, "data-state": state, text: state }); }

// -- token -----------------------------------------------------------------------------
function token() { try { return localStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; } }
function setToken(t) { try { if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY); } catch (e) { /* private mode */ } }
function authHeaders() { const t = token(); return t ? { Authorization: "Bearer " + t } : {}; }
function takeTokenFromHash() {
  // http://127.0.0.1:PORT/#token=...: keep it, then remove it from the address bar
  const m = location.hash.match(/[#&]token=([A-Za-z0-9_\-]+)/);
  if (m) { setToken(m[1]); history.replaceState(null, "", location.pathname + "#/"); }
}
function askToken(then) {
  S.pendingAction = then || null;
  $("#token-input").value = "";
  const dlg = $("#token-dialog");
  if (typeof dlg.showModal === "function") dlg.showModal(); else dlg.setAttribute("open", "");
  $("#token-input").focus();
}

function toast(text, bad) {
  const el = $("#toast");
  el.textContent = text; el.className = bad ? "bad" : "good"; el.hidden = false;
  clearTimeout(toast.t); toast.t = setTimeout(() => { el.hidden = true; }, 5000);
}

// -- network ---------------------------------------------------------------------------
async function getJSON(url) {
  const r = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  if (r.status === 401) { const e = new Error("token needed"); e.status = 401; throw e; }
  if (!r.ok) { const e = new Error((await r.json().catch(() => ({}))).error || r.statusText); e.status = r.status; throw e; }
  return r.json();
}
async function act(action, id) {
  if (!token()) { askToken(() => act(action, id)); return; }
  const r = await fetch(`/api/datasets/${id}/${action}`, { method: "POST", headers: authHeaders(), cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) { setToken(""); toast("The token was refused: paste the current one.", true); askToken(() => act(action, id)); return; }
  if (!r.ok) { toast(body.error || `${action} failed (${r.status})`, true); return; }
  toast(body.message || `${action}: done`);
  poll();
}
// pause or resume the whole agent (drop null) or one drop folder
async function actScope(action, drop) {
  if (!token()) { askToken(() => actScope(action, drop)); return; }
  const url = `/api/${action}` + (drop ? `?drop=${encodeURIComponent(drop)}` : "");
  const r = await fetch(url, { method: "POST", headers: authHeaders(), cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) { setToken(""); toast("The token was refused: paste the current one.", true); askToken(() => actScope(action, drop)); return; }
  if (!r.ok) { toast(body.error || `${action} failed (${r.status})`, true); return; }
  toast(body.message || `${action}: done`);
  poll();
}
function pausedScope(scope, target) {
  return ((S.data && S.data.health.pauses) || []).find((p) => p.scope === scope && p.target === target) || null;
}
function rate(r) { return r ? size(r) + "/s" : "off"; }

async function poll() {
  clearTimeout(S.timer);
  let wait = (S.data && S.data.poll_ms) || 1000;
  try {
    const data = await getJSON("/api/state");
    S.data = data;
    if (data.token_path) $("#token-path").textContent = data.token_path;
    setConn(true);
    if (S.tick % 3 === 0) S.timeline = await getJSON("/api/timeline?limit=30");
    S.tick++;
    const route = currentRoute();
    if (route.id !== null) S.detail = await getJSON(`/api/datasets/${route.id}`).catch((e) => (e.status === 404 ? { missing: true, id: route.id } : S.detail));
    render();
  } catch (e) {
    setConn(false, e.status === 401 ? "token needed to read" : "agent not reachable");
    if (e.status === 401 && !$("#token-dialog").open) askToken(null);
    wait = Math.min(5000, wait * 2);
  }
  S.timer = setTimeout(poll, wait);
}
function setConn(ok, why) {
  const el = $("#conn");
  el.dataset.ok = ok ? "1" : "0";
  el.textContent = ok ? "live · " + new Date().toLocaleTimeString() : why;
}

// -- routing ---------------------------------------------------------------------------
function currentRoute() {
  const m = location.hash.match(/^#\/dataset\/(\d+)/);
  return { id: m ? Number(m[1]) : null };
}
function render() {
  if (!S.data) return;
  const route = currentRoute();
  $("#view-overview").hidden = route.id !== null;
  $("#view-dataset").hidden = route.id === null;
  renderSummary();
  if (route.id === null) { renderHealth(); renderDrops(); renderGantt(); renderDatasets(); }
  else renderDetail();
}

// -- overview --------------------------------------------------------------------------
function counts(list) {
  const c = {};
  for (const d of list) c[d.state] = (c[d.state] || 0) + 1;
  return c;
}
function renderSummary() {
  const c = (S.data.counts && S.data.counts["*"]) || counts(S.data.datasets);
  const parts = STATE_ORDER.filter((s) => c[s]).map((s) => h("span", { class: "count s-" + s, "data-state": s }, `${c[s]} ${s}`));
  $("#summary").replaceChildren(...parts);
  const all = pausedScope("all", "");
  const btn = $("#pause-all");
  btn.textContent = all ? "Resume all" : "Pause all";
  btn.dataset.action = all ? "resume" : "pause";
  btn.title = all ? `paused by ${all.by} (${all.via}) since ${clock(all.since)}` : "hold every dataset: nothing new starts";
}
function card(title, value, note, level) {
  return h("div", { class: "card " + (level || "") }, h("div", { class: "card-title", text: title }),
    h("div", { class: "card-value", text: value }), note ? h("div", { class: "card-note", text: note }) : null);
}
function renderHealth() {
  const hl = S.data.health;
  const cards = [];
  for (const s of hl.servers) {
    const reach = s.reachable === null ? "checking…" : s.reachable ? "reachable" : "unreachable";
    const key = s.paused ? "refused: paused" : { accepted: "key accepted", refused: "key refused", missing: "no key", unknown: "key not checked" }[s.key];
    const level = s.paused || s.key === "refused" || s.key === "missing" ? "bad" : s.reachable === false ? "warn" : s.reachable ? "good" : "";
    const bw = (hl.bandwidth || {})[s.url];
    const limit = bw && (bw.upload || bw.download) ? ` · limit up ${rate(bw.upload)}, down ${rate(bw.download)}` : "";
    const note = s.url.replace(/^https?:\/\//, "") + " · " + (s.paused || s.message || (s.checked ? "checked " + ago(s.checked) + " ago" : "not checked yet")) + limit;
    cards.push(card("VIP server", `${reach}, ${key}`, note, level));
  }
  const observers = hl.drops.map((d) => d.observer);
  const native = observers.filter((o) => o === "native").length;
  cards.push(card("File events", observers.length ? (native === observers.length ? "native" : native ? "native + polling" : observers.every((o) => o === "polling") ? "polling" : observers.join(", ")) : "—",
    `${observers.length} drop folder${observers.length === 1 ? "" : "s"}`, observers.some((o) => o !== "native" && o !== "polling") ? "warn" : "good"));
  const low = hl.drops.filter((d) => d.disk_low);
  const free = hl.drops.map((d) => d.free_bytes).filter((x) => x !== null);
  cards.push(card("Free disk", free.length ? size(Math.min(...free)) : "—", low.length ? "below the disk_low threshold" : "output folders", low.length ? "bad" : "good"));
  const rescans = hl.drops.map((d) => d.last_rescan).filter(Boolean);
  cards.push(card("Last rescan", rescans.length ? ago(Math.min(...rescans)) + " ago" : "—", "agent up " + dur(hl.now - hl.started), ""));
  if (hl.dicom) {  // the DICOM node (docs/dicom.md): studies still in its spool
    const n = hl.dicom.node, c = n.counters || {}, p = hl.dicom.pending;
    const stuck = p.filter((s) => s.state !== "pending").length;
    const what = p.map((s) => `${s.study} ${s.state} (${s.objects})`).join(", ");
    cards.push(card("DICOM studies pending", String(p.length),
      `${n.ae_title} on ${n.host}:${n.port} · ${c.objects || 0} objects, ${c.refusals || 0} refused` + (what ? " · " + what : ""),
      stuck ? "warn" : (c.refusals ? "warn" : "good")));
  }
  $("#health").replaceChildren(...cards);
}
function renderDrops() {
  const rows = S.data.health.drops.map((d) => {
    const c = (S.data.counts && S.data.counts[d.path]) || {};
    const chips = STATE_ORDER.filter((s) => c[s]).map((s) => h("span", { class: "count s-" + s }, `${c[s]} ${s}`));
    return h("tr", {}, h("td", { class: "path", text: d.path }), h("td", { text: d.server.replace(/^https?:\/\//, "") }),
      h("td", {}, h("span", { class: "obs o-" + d.observer.replace(/\s/g, "-"), text: d.observer })),
      h("td", {}, chips.length ? chips : h("span", { class: "muted", text: "none" })),
      h("td", { class: d.disk_low ? "bad-text" : "", text: size(d.free_bytes) }),
      h("td", { text: d.last_rescan ? ago(d.last_rescan) + " ago" : "—" }),
      h("td", {}, dropPauseButton(d.path)));
  });
  fill($("#drops tbody"), rows);
}
function dropPauseButton(path) {
  const p = pausedScope("drop", path);
  const b = h("button", { type: "button", class: "ghost small", "data-drop": path, text: p ? "Resume" : "Pause",
    title: p ? `paused by ${p.by} (${p.via}) since ${clock(p.since)}` : "hold this drop folder's datasets" });
  b.addEventListener("click", () => actScope(p ? "resume" : "pause", path));
  return b;
}

// -- datasets table --------------------------------------------------------------------
function progressCell(d) {
  const live = S.data.live[String(d.id)];
  const p = d.progress || {};
  if (live && live.total) {
    const pct = Math.min(100, (100 * live.done) / live.total);
    const bar = h("div", { class: "bar " + live.kind, title: `${pct.toFixed(1)} %` }, h("span"));
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    const rate = live.rate ? size(live.rate) + "/s" : "";
    const eta = live.eta ? "ETA " + dur(live.eta) : "";
    return h("div", { class: "prog" }, bar,
      h("div", { class: "prog-text", text: `${live.kind} ${size(live.done)} of ${size(live.total)}` + (rate ? ` · ${rate}` : "") + (eta ? ` · ${eta}` : "") }));
  }
  if (p.kind === "waiting" && (d.state === "waiting" || d.state === "paused")) return h("span", { class: "muted", text: p.reason || "" });
  // what a queued or paused dataset waits for (the cap, a paused server, a pause): agent/web/source.py
  if (d.waiting_for) return h("span", { class: "muted waiting-for", text: d.waiting_for });
  const st = Object.values(d.execution_status || {});
  if (st.length && ["running", "queued", "downloading", "cleaning"].includes(d.state)) {
    const ended = st.filter((s) => !["Running", "Ready", "Initializing", null].includes(s)).length;
    return h("span", { text: `${ended}/${st.length} executions ended · ${[...new Set(st)].join(", ")}` });
  }
  if (d.state === "done" && d.finished) return h("span", { class: "muted", text: "took " + dur(d.finished - d.created) });
  return "";
}
function sortValue(d, key) {
  if (key === "state") return STATE_ORDER.indexOf(d.state);
  if (key === "progress") { const l = S.data.live[String(d.id)]; return l && l.total ? l.done / l.total : -1; }
  const v = d[key];
  return typeof v === "string" ? v.toLowerCase() : v || 0;
}
function renderDatasets() {
  const all = S.data.datasets;
  const sel = $("#state-filter");
  const states = [...new Set(all.map((d) => d.state))].sort((a, b) => STATE_ORDER.indexOf(a) - STATE_ORDER.indexOf(b));
  const have = [...sel.options].map((o) => o.value).slice(1);
  if (have.join() !== states.join()) {
    const keep = sel.value;
    sel.replaceChildren(h("option", { value: "", text: "all states" }), ...states.map((s) => h("option", { value: s, text: s })));
    sel.value = states.includes(keep) ? keep : "";
  }
  const q = $("#filter").value.trim().toLowerCase();
  const want = sel.value;
  let list = all.filter((d) => (!want || d.state === want) &&
    (!q || [d.name, d.state, d.error || "", String(d.id)].some((x) => x.toLowerCase().includes(q))));
  const { key, dir } = S.sort;
  list = list.slice().sort((a, b) => { const x = sortValue(a, key); const y = sortValue(b, key); return (x < y ? -1 : x > y ? 1 : 0) * dir || (b.id - a.id); });
  const rows = list.map((d) => h("tr", { "data-id": d.id, "data-state": d.state, class: "row s-row-" + d.state },
    h("td", { class: "num muted", text: d.id }),
    h("td", { class: "name" }, h("a", { href: "#/dataset/" + d.id, text: d.name })),
    h("td", {}, badge(d.state)),
    h("td", { class: "progress" }, progressCell(d)),
    h("td", { class: "when", text: ago(d.created), title: clock(d.created) }),
    h("td", { class: "when", text: ago(d.updated) + " ago", title: clock(d.updated) }),
    h("td", { class: "error" }, d.error ? h("pre", { text: d.error }) : "")));
  fill($("#datasets tbody"), rows);
  $("#empty").hidden = all.length > 0;
  const total = Object.values((S.data.counts && S.data.counts["*"]) || {}).reduce((a, b) => a + b, 0);
  let shown = list.length === all.length ? `${all.length} datasets` : `${list.length} of ${all.length}`;
  if (total > all.length) shown += ` (every unfinished one and the ${S.data.limit} most recent others, of ${total}; \`vip-agent status\` lists all)`;
  $("#shown").textContent = shown;
  for (const th of document.querySelectorAll("#datasets th[data-sort]")) {
    th.dataset.dir = th.dataset.sort === key ? (dir > 0 ? "asc" : "desc") : "";
  }
}

// -- timeline (Gantt) ----------------------------------------------------------------
// It opens on the recent window: what ran in the last RECENT_S seconds and what is still
// going; older datasets (a demo from last week) would squeeze today's work into a corner.
// "Show all" zooms out to every dataset the timeline API returned.
const RECENT_S = 3600;
function ganttItems(now) {
  const all = (S.timeline || []).filter((t) => t.segments.length);
  const recent = all.filter((t) => !t.finished || t.finished >= now - RECENT_S);
  const zoomed = S.ganttAll || !recent.length;
  return { all, recent, items: zoomed ? all : recent, zoomed };
}
function ganttControls(all, recent, zoomed) {
  const older = all.length - recent.length;
  if (!older) return null;
  const note = zoomed ? `all ${all.length} recent datasets` : `the last hour · ${older} older dataset${older === 1 ? "" : "s"} hidden`;
  const btn = h("button", { id: "gantt-zoom", type: "button", class: "ghost-small", text: zoomed ? "Last hour" : "Show all" });
  btn.addEventListener("click", () => { S.ganttAll = !zoomed; renderGantt(); });
  return h("div", { class: "gantt-controls" }, h("span", { class: "muted", id: "gantt-window", text: note }), recent.length ? btn : null);
}
function renderGantt() {
  const box = $("#gantt");
  const now = S.data.health.now;
  const { all, recent, items, zoomed } = ganttItems(now);
  if (!items.length) { box.replaceChildren(h("p", { class: "muted", text: "Nothing has run yet." })); return; }
  let t0 = Math.min(...items.map((t) => t.segments[0].start));
  if (!zoomed) t0 = Math.max(t0, now - RECENT_S);
  const t1 = Math.max(now, ...items.map((t) => t.finished || now));
  const W = Math.max(600, (box.clientWidth || 900) - 22), label = 170, right = 14, row = 20, top = 22;
  const slotsH = 34;
  const H = top + items.length * row + slotsH + 18;
  const span = Math.max(1, t1 - t0);
  const x = (t) => label + ((Math.min(t1, Math.max(t0, t)) - t0) / span) * (W - label - right);
  const g = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "timeline of recent datasets", "data-start": t0, "data-end": t1 });
  // time axis: about 6 ticks
  const step = niceStep(span / 6);
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    g.append(svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: H - 16, class: "tick" }));
    g.append(svg("text", { x: x(t), y: 12, class: "tick-label", "text-anchor": "middle" }, new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: span < 900 ? "2-digit" : undefined })));
  }
  items.forEach((t, i) => {
    const y = top + i * row;
    const name = t.name.length > 24 ? t.name.slice(0, 23) + "…" : t.name;
    const link = svg("a", { href: "#/dataset/" + t.id, "data-id": t.id });
    link.append(svg("text", { x: label - 8, y: y + 13, "text-anchor": "end", class: "lane-label s-text-" + t.state }, name));
    link.firstChild.append(svg("title", {}, t.name));
    g.append(link);
    for (const s of t.segments) {
      if (s.phase === "waiting") continue;
      const e = s.end || t.finished || now;
      if (e < t0) continue; // before the window
      const x0 = x(s.start), x1 = x(e);
      const r = svg("rect", { x: x0, y: y + 3, width: Math.max(1.5, x1 - x0), height: row - 6, rx: 2, fill: PHASE_COLORS[s.phase] || "#999" });
      r.append(svg("title", {}, `${t.name}: ${s.phase} ${dur(e - s.start)}`));
      g.append(r);
    }
    if (t.state === "failed" || t.state === "incomplete") {
      const xe = x(t.finished || now);
      g.append(svg("text", { x: xe + 3, y: y + 14, class: "fail-mark" }, "✕"));
    }
  });
  // slot use: executions running at once vs the cap
  const yS = top + items.length * row + 6;
  const cap = Math.max(1, ...S.data.health.drops.map((d) => d.max_running || 1));
  const edges = [];
  for (const t of items) for (const s of t.segments) if (s.phase === "run") { edges.push([s.start, 1]); edges.push([s.end || t.finished || now, -1]); }
  edges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const hS = slotsH - 10, yOf = (n) => yS + hS - (Math.min(n, cap) / cap) * hS;
  let n = 0, px = x(t0), path = `M${px},${yOf(0)}`;
  for (const [t, d] of edges) { const xx = x(t); path += ` L${xx},${yOf(n)}`; n += d; path += ` L${xx},${yOf(n)}`; }
  path += ` L${x(t1)},${yOf(n)} L${x(t1)},${yOf(0)} Z`;
  g.append(svg("rect", { x: label, y: yS, width: W - label - right, height: hS, class: "slot-bg" }));
  g.append(svg("path", { d: path, class: "slot-use" }));
  g.append(svg("text", { x: label - 8, y: yS + hS - 4, "text-anchor": "end", class: "lane-label" }, `running (cap ${cap})`));
  const legend = h("div", { class: "legend" }, ...PHASE_ORDER.map((p) => {
    const sw = h("span", { class: "swatch" }); sw.style.background = PHASE_COLORS[p];
    return h("span", {}, sw, p);
  }));
  box.replaceChildren(...[ganttControls(all, recent, zoomed), g, legend].filter(Boolean));
}
function niceStep(raw) {
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  return steps.find((s) => s >= raw) || 86400;
}

// -- one dataset -------------------------------------------------------------------------
function renderDetail() {
  const d = S.detail;
  if (!d) return;
  if (d.missing) { $("#d-name").textContent = `no dataset #${d.id}`; return; }
  const rec = S.data.datasets.find((x) => x.id === d.id) || d;
  $("#d-name").textContent = d.name;
  $("#d-state").replaceWith(Object.assign(badge(d.state), { id: "d-state" }));
  const final = ["done", "failed", "cancelled", "incomplete"].includes(d.state);
  $("#act-retry").disabled = !(d.state === "failed" || d.state === "cancelled" || d.state === "incomplete");
  $("#act-cancel").disabled = final;
  $("#act-rerun").disabled = !final;
  $("#act-pause").disabled = final || d.state === "paused";
  $("#act-resume").disabled = !d.paused_by;
  $("#d-progress").replaceChildren(progressCell(rec) || "");
  const err = $("#d-error");
  err.hidden = !d.error; err.textContent = d.error || "";
  const facts = [["id", "#" + d.id], ["path", d.path], ["output", d.output || d.output_dir || ""], ["server", d.server || ""],
    ["attempt", d.attempt], ["created", clock(d.created)], ["finished", clock(d.finished)]];
  $("#d-facts").replaceChildren(...facts.filter((f) => f[1] !== "" && f[1] !== undefined && f[1] !== null)
    .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
  // stage strip from the journal
  const segs = d.segments || [];
  const end = d.finished || S.data.health.now;
  const total = segs.length ? Math.max(1, end - segs[0].start) : 1;
  const strip = h("div", { class: "strip" }, ...segs.map((s) => {
    const el = h("span", { class: "seg", title: `${s.phase}: ${dur((s.end || end) - s.start)}` }, h("b", { text: s.phase }), h("i", { text: dur((s.end || end) - s.start) }));
    el.style.flexGrow = String(Math.round(1000 * Math.max(0.04, ((s.end || end) - s.start) / total)));
    el.style.background = PHASE_COLORS[s.phase] || "#999";
    return el;
  }));
  if (d.finished) strip.append(h("span", { class: "seg-final s-" + d.state, text: d.state }));
  $("#d-stages").replaceChildren(segs.length ? strip : h("span", { class: "muted", text: "no stage yet" }));
  fill($("#d-execs tbody"), (d.runs || []).map((e) => h("tr", {},
    h("td", { text: e.name || e.key || "" }), h("td", { class: "mono", text: e.vip_id || "—" }),
    h("td", {}, h("span", { class: "vip-status v-" + String(e.status || "none"), text: e.status || "not launched" })),
    h("td", { text: clock(e.launched) }), h("td", { text: clock(e.ended) }))), "no execution launched");
  fill($("#d-outputs tbody"), (d.outputs || []).map((o) => h("tr", {},
    h("td", { class: "path", text: o.kind === "folder" ? o.extracted_to + "/" : (o.local || o.remote || o.path || "") }), h("td", { class: "num", text: size(o.size) }),
    h("td", { text: o.downloaded ? (o.kind === "folder" ? "yes, extracted into a folder" : "yes") : "no" }))), "no output yet");
  const logs = d.log_texts || [];
  $("#d-logs").replaceChildren(...(logs.length ? logs.map((l) => h("details", {}, h("summary", { text: `${l.path} (${size(l.size)})` }), h("pre", { class: "log", text: l.text || "" })))
    : [h("p", { class: "muted", text: "no log saved yet" })]));
  fill($("#d-events tbody"), (d.events || []).slice().reverse().map((e) => h("tr", { class: "lvl-" + (e.level || "info") },
    h("td", { class: "when", text: clock(e.time) }), h("td", { text: e.stage || "" }), h("td", { class: "msg" }, h("pre", { text: e.message })))), "nothing recorded");
}

// -- wiring ------------------------------------------------------------------------------
function init() {
  takeTokenFromHash();
  $("#filter").addEventListener("input", () => S.data && renderDatasets());
  $("#state-filter").addEventListener("change", () => S.data && renderDatasets());
  for (const th of document.querySelectorAll("#datasets th[data-sort]")) {
    th.addEventListener("click", () => {
      const k = th.dataset.sort;
      S.sort = { key: k, dir: S.sort.key === k ? -S.sort.dir : (k === "name" ? 1 : -1) };
      renderDatasets();
    });
  }
  for (const b of document.querySelectorAll("#actions button")) {
    b.addEventListener("click", () => { const r = currentRoute(); if (r.id !== null) act(b.dataset.action, r.id); });
  }
  $("#token-btn").addEventListener("click", () => askToken(null));
  $("#pause-all").addEventListener("click", (ev) => actScope(ev.currentTarget.dataset.action || "pause", null));
  $("#token-form").addEventListener("submit", () => {
    setToken($("#token-input").value.trim());
    const then = S.pendingAction; S.pendingAction = null;
    if (then) then(); else poll();
  });
  $("#token-forget").addEventListener("click", () => { setToken(""); $("#token-dialog").close(); toast("Token forgotten"); });
  window.addEventListener("hashchange", () => {
    S.detail = null;
    $("#d-name").textContent = "loading…";
    $("#d-error").hidden = true;
    for (const b of document.querySelectorAll("#actions button")) b.disabled = true;
    poll(); window.scrollTo(0, 0);
  });
  poll();
}
document.addEventListener("DOMContentLoaded", init);
