// The supernode dashboard: polls the JSON endpoints (docs/api.md, "Dashboard") about
// once a second and redraws. Text from the server only ever goes through textContent.
"use strict";

const POLL_MS = 1000;
const MAX_CELLS = 256; // more pieces than this: one cell stands for a group of pieces
const state = { selected: null, token: sessionStorage.getItem("df-token"), tick: 0, peers: [] };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function bytes(n) {
  if (n < 0) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

const short = (id) => (id ? id.slice(0, 8) : "-");
const pct = (a, b) => (b > 0 ? Math.min(100, Math.round((100 * a) / b)) : 0);

function bits(b64) {
  const raw = atob(b64 || "");
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

const has = (bm, n) => (n >> 3) < bm.length && (bm[n >> 3] & (0x80 >> (n & 7))) !== 0;

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function getJSON(path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, { headers, signal: AbortSignal.timeout(5000) });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401 || resp.status === 403) {
    $("token-form").hidden = false;
    throw new HttpError(resp.status, "an API token is required");
  }
  if (!resp.ok) throw new HttpError(resp.status, (body && body.message) || "HTTP " + resp.status);
  return body;
}

function showError(err) {
  const e = $("error");
  e.hidden = !err;
  e.textContent = err ? "⚠ " + err.message : "";
}

// --- tasks ---------------------------------------------------------------------------
function renderTasks(data) {
  $("node").textContent = "supernode " + short(data.supernode_id) + " · v" + data.version;
  const body = $("tasks").tBodies[0];
  body.replaceChildren();
  $("tasks-empty").hidden = data.tasks.length > 0;
  for (const row of data.tasks) {
    const t = row.task;
    const count = t.piece_count;
    const copies = count > 0 ? count * row.clients : 0;
    const progress = el("progress", { max: String(copies || 1), value: String(row.held) });
    const tr = el("tr", { "data-task-id": t.task_id, class: t.task_id === state.selected ? "selected" : "" },
      el("td", {}, el("code", { text: short(t.task_id) })),
      el("td", { class: "url", text: row.url, title: row.url }),
      el("td", {}, el("span", { class: "status " + t.status, text: t.status })),
      el("td", { text: bytes(t.length) }),
      el("td", { class: "cdn-progress", text: row.cdn_pieces + " / " + (count >= 0 ? count : "?") + " (" + bytes(row.cdn_bytes) + ")" }),
      el("td", { class: "clients", text: String(row.clients) }),
      el("td", { class: "done" }, progress,
        el("span", { class: "done-text", text: " " + row.held + " / " + copies + " · " + pct(row.held, copies) + "% · " + bytes(row.held_bytes) })));
    tr.addEventListener("click", () => select(t.task_id));
    body.append(tr);
  }
}

function renderPeers(data) {
  state.peers = data.peers;
  const body = $("peers").tBodies[0];
  body.replaceChildren();
  $("peers-empty").hidden = data.peers.length > 0;
  for (const p of data.peers) {
    body.append(el("tr", { "data-peer-id": p.peer_id },
      el("td", {}, el("code", { text: short(p.peer_id) })),
      el("td", { class: "addr", text: p.ip + ":" + p.port }),
      el("td", { text: p.kind }),
      el("td", { text: String(p.tasks) }),
      el("td", { class: p.alive ? "alive" : "dead", text: p.alive ? "yes" : "no" })));
  }
}

// --- piece map -----------------------------------------------------------------------
function sourceLabel(f) {
  if (f.kind === "cdn") return "CDN";
  if (f.kind === "peer") return f.addr;
  return "? " + short(f.source);
}

function cellsFor(count, held, fetching) {
  // one cell per piece, or per group of pieces when there are many
  const group = Math.max(1, Math.ceil(count / MAX_CELLS));
  const cells = [];
  for (let start = 0; start < count; start += group) {
    const end = Math.min(count, start + group);
    let n = 0;
    let fetch = null;
    for (let p = start; p < end; p++) {
      if (held(p)) n++;
      if (!fetch && fetching.has(p)) fetch = fetching.get(p);
    }
    let cls = "cell";
    if (fetch) cls += fetch.kind === "cdn" ? " fetch-cdn" : " fetch-peer";
    else if (n === end - start) cls += " held";
    else if (n > 0) cls += " part";
    const name = group === 1 ? "piece " + start : "pieces " + start + "-" + (end - 1);
    const title = name + (fetch ? ": fetching from " + sourceLabel(fetch) : n ? ": held" : ": missing");
    cells.push(el("span", { class: cls, "data-piece": String(start), title }));
  }
  return cells;
}

function mapRow(key, label, sub, count, bitmap, fetching) {
  const bm = bits(bitmap);
  let held = 0;
  for (let p = 0; p < count; p++) if (has(bm, p)) held++;
  return el("div", { class: "maprow", "data-row": key, "data-held": String(held), "data-count": String(count) },
    el("div", { class: "label" }, el("div", { class: "name", text: label }), el("div", { class: "sub muted", text: sub })),
    el("div", { class: "cells" }, ...cellsFor(count, (p) => has(bm, p), fetching)));
}

function renderMap(m) {
  const t = m.task;
  const count = m.piece_count;
  $("detail").hidden = false;
  $("detail-id").textContent = t.task_id;
  $("detail-summary").textContent = m.url + " · " + t.status + " · " + bytes(t.length) + " in " +
    (count >= 0 ? count : "?") + " pieces of " + bytes(t.piece_size) + " · " + m.clients_total + " clients";
  const rows = [];
  const cdnSub = "CDN " + (m.cdn.here ? "(this supernode) " : "") + short(m.cdn.id) + " · " +
    m.cdn.pieces + "/" + count + " · sending " + m.cdn.uploads;
  rows.push(mapRow("cdn", "supernode CDN", cdnSub, count, m.cdn.bitmap, new Map()));
  const flight = $("inflight").tBodies[0];
  flight.replaceChildren();
  for (const c of m.clients) {
    const fetching = new Map(c.fetching.map((f) => [f.piece, f]));
    const from = c.fetching.map((f) => "#" + f.piece + " ← " + sourceLabel(f)).join(", ");
    const sub = c.kind + " · " + c.pieces + "/" + count + " · " + bytes(c.bytes) + " · sending " + c.uploads +
      (c.failures ? " · " + c.failures + " failed" : "") + (from ? " · fetching " + from : "");
    rows.push(mapRow(c.cid, c.ip + ":" + c.port, sub, count, c.bitmap, fetching));
    for (const f of c.fetching) {
      flight.append(el("tr", { "data-cid": c.cid },
        el("td", { text: c.ip + ":" + c.port }), el("td", { text: String(f.piece) }),
        el("td", { class: "from-" + f.kind, text: sourceLabel(f) })));
    }
  }
  $("piecemap").replaceChildren(...rows);
  $("map-note").textContent = m.truncated ? "showing " + m.clients.length + " of " + m.clients_total + " clients" : "";
}

function select(taskId) {
  state.selected = taskId;
  history.replaceState(null, "", "#task=" + taskId);
  for (const tr of $("tasks").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.taskId === taskId);
  refreshMap().catch(showError);
}

async function refreshMap() {
  if (!state.selected) return;
  try {
    renderMap(await getJSON("/api/v1/tasks/" + state.selected + "/map"));
  } catch (err) {
    if (err.status === 404) { state.selected = null; $("detail").hidden = true; }
    throw err;
  }
}

async function poll() {
  try {
    const jobs = [getJSON("/api/v1/ui/tasks").then(renderTasks), refreshMap()];
    if (state.tick % 3 === 0) jobs.push(getJSON("/api/v1/ui/peers").then(renderPeers));
    await Promise.all(jobs);
    showError(null);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    showError(err);
  } finally {
    state.tick++;
    setTimeout(poll, POLL_MS);
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim() || null;
  if (state.token) sessionStorage.setItem("df-token", state.token);
  $("token-form").hidden = true;
  state.tick = 0;
});

const fromHash = /^#task=([0-9a-f]{64})$/.exec(location.hash);
if (fromHash) state.selected = fromHash[1];
poll();
