// The dashboard: polls the admin API (same origin, read-only) and redraws. Every value from the
// API goes in with textContent, never as HTML: SNI names in refusals are whatever clients sent.
"use strict";

const REFRESH_MS = 2000;
const WINDOW_S = 600;           // the chart shows the last ten minutes
const SAMPLES_KEY = "twisted-gateway.samples";
let samples = [];
try { samples = JSON.parse(sessionStorage.getItem(SAMPLES_KEY) || "[]"); } catch (e) { samples = []; }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fill(table, rows, columns, empty) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", empty, "empty");
    td.colSpan = columns;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const row of rows) body.append(row);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function when(unix) {
  if (unix === null || unix === undefined) return "–";
  return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  if (s < 172800) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

async function get(view) {
  const response = await fetch(`/api/v1/${view}`, {credentials: "same-origin", cache: "no-store"});
  if (!response.ok) throw new Error(`${view}: HTTP ${response.status}`);
  return response.json();
}

function showRoutes(doc) {
  document.getElementById("hostname").textContent = doc.hostname;
  const rows = [];
  for (const shard of doc.shards) {
    for (const port of shard.ports) {
      const tr = el("tr");
      tr.dataset.shard = shard.id;
      tr.dataset.port = port.port;
      tr.dataset.name = port.name;
      tr.append(el("td", shard.id + (shard.primary ? "" : " (replica)")), el("td", port.port, "port"),
                el("td", port.protocol + (port.public ? "" : ", private")), el("td", port.name, "name"),
                el("td", port.target, "name"),
                el("td", port.active_connections ?? "–", "num active"),
                el("td", port.connections ?? "–", "num connections"),
                el("td", bytes(port.bytes_up), "num up"), el("td", bytes(port.bytes_down), "num down"));
      tr.children[5].dataset.value = port.active_connections ?? "";
      tr.children[6].dataset.value = port.connections ?? "";
      tr.children[7].dataset.value = port.bytes_up ?? "";
      tr.children[8].dataset.value = port.bytes_down ?? "";
      rows.push(tr);
    }
  }
  fill("routes", rows, 9, doc.directory.loaded ? "the directory has no shards" : "the directory is not loaded yet");
  document.getElementById("tile-shards").textContent = doc.directory.shards;
  document.getElementById("tile-open").textContent = doc.totals.open_connections;
  const now = doc.time;
  const total = (doc.totals.bytes_up || 0) + (doc.totals.bytes_down || 0);
  const last = samples[samples.length - 1];
  let rate = 0;
  if (last && now > last.t && total >= last.total) rate = (total - last.total) / (now - last.t);
  samples.push({t: now, open: doc.totals.open_connections, total: total, rate: rate});
  samples = samples.filter(s => s.t >= now - WINDOW_S);
  try { sessionStorage.setItem(SAMPLES_KEY, JSON.stringify(samples)); } catch (e) { /* full: keep in memory */ }
  document.getElementById("tile-rate").textContent = bytes(Math.round(rate));
  drawChart(now);
}

function showCertificates(doc) {
  const rows = [];
  let soonest = null;
  for (const cert of doc.certificates) {
    const tr = el("tr");
    tr.dataset.names = cert.names.join(" ");
    const left = cert.not_after_timestamp === null ? null : (cert.not_after_timestamp - doc.time) / 86400;
    if (left !== null && !cert.ca && (soonest === null || cert.not_after_timestamp < soonest.not_after_timestamp)) soonest = cert;
    const source = {file: "file", local_ca: cert.ca ? "local CA (the CA)" : "local CA", acme: "ACME"}[cert.source] || cert.source;
    const leftCell = el("td", left === null ? "missing" : left.toFixed(1), "num " + (left === null || left < 7 ? "bad" : left < 21 ? "warn" : "ok"));
    const error = cert.last_error ? `${cert.failures} failed: ${cert.last_error}` : "";
    tr.append(el("td", cert.names.join(", "), "name"), el("td", source), el("td", cert.issuer ?? "–"),
              el("td", cert.not_after ?? "–", "not-after"), leftCell,
              el("td", cert.renew_at ? when(cert.renew_at) : "–"), el("td", error, error ? "bad" : ""));
    rows.push(tr);
  }
  fill("certificates", rows, 7, "no certificate in force yet");
  document.getElementById("tile-expiry").textContent = soonest ? soonest.not_after.slice(0, 10) : "–";
}

function showRefusals(doc) {
  const rows = doc.refusals.slice(0, 100).map(r => {
    const tr = el("tr");
    tr.dataset.sni = r.sni ?? "";
    tr.append(el("td", when(r.time)), el("td", r.client, "name"), el("td", r.sni ?? "(no SNI: refused on connect)", "name sni"),
              el("td", r.reason, "reason"), el("td", r.detail));
    return tr;
  });
  fill("refusals", rows, 5, "nothing refused");
  document.getElementById("tile-refusals").textContent = doc.recorded;
}

function showWorkers(doc) {
  const rows = [];
  if (doc.supervisor) {
    const tr = el("tr");
    tr.append(el("td", "supervisor"), el("td", doc.supervisor.pid), el("td", duration(doc.supervisor.uptime_seconds), "num"),
              el("td", doc.supervisor.restarts, "num"), el("td", "", "num"));
    rows.push(tr);
  }
  for (const w of doc.workers) {
    const tr = el("tr");
    tr.append(el("td", w.index === null ? "gateway" : `worker ${w.index}` + (w.answered ? "" : " (not answering)")),
              el("td", w.pid ?? "–"), el("td", duration(w.uptime_seconds), "num"),
              el("td", w.restarts, "num" + (w.restarts ? " warn" : "")), el("td", w.open_connections ?? "–", "num"));
    rows.push(tr);
  }
  fill("workers", rows, 5, "no process");
}

function showProviders(doc) {
  const rows = doc.providers.map(p => {
    const tr = el("tr");
    tr.append(el("td", p.kind), el("td", p.source ?? "–", "name"),
              el("td", p.state + (p.last_error ? `: ${p.last_error}` : ""), p.state === "ok" ? "ok" : "bad"),
              el("td", p.version ?? "–", "name"),
              el("td", p.lag_seconds === null || p.lag_seconds === undefined ? "–" : p.lag_seconds.toFixed(3) + " s", "num"),
              el("td", when(p.last_change)));
    return tr;
  });
  fill("providers", rows, 6, "the built-in demo shard (no provider)");
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function drawChart(now) {
  const width = 1000, height = 160, left = 40, right = 60, top = 10, bottom = 20;
  const chart = svg("svg", {viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img",
                            "aria-label": "open connections and bytes per second over the last minutes"});
  const maxOpen = Math.max(1, ...samples.map(s => s.open));
  const maxRate = Math.max(1, ...samples.map(s => s.rate));
  const x = t => left + (width - left - right) * (1 - (now - t) / WINDOW_S);
  const y = (v, max) => top + (height - top - bottom) * (1 - v / max);
  for (let i = 0; i <= 4; i++) {
    const gy = top + (height - top - bottom) * i / 4;
    chart.append(svg("line", {x1: left, x2: width - right, y1: gy, y2: gy, class: "grid"}));
  }
  for (let m = 0; m <= WINDOW_S / 60; m += 2) {
    const label = svg("text", {x: x(now - m * 60), y: height - 4, "text-anchor": "middle"});
    label.textContent = m ? `-${m} min` : "now";
    chart.append(label);
  }
  const axis = (text, ax, anchor) => {
    const t = svg("text", {x: ax, y: top + 10, "text-anchor": anchor});
    t.textContent = text;
    chart.append(t);
  };
  axis(String(maxOpen), left - 4, "end");
  axis(bytes(Math.round(maxRate)) + "/s", width - right + 4, "start");
  if (samples.length > 1) {
    const path = (value, max) => samples.map((s, i) => `${i ? "L" : "M"}${x(s.t).toFixed(1)},${y(value(s), max).toFixed(1)}`).join(" ");
    chart.append(svg("path", {d: path(s => s.open, maxOpen), class: "conn"}));
    chart.append(svg("path", {d: path(s => s.rate, maxRate), class: "bytes"}));
  }
  document.getElementById("chart").replaceChildren(chart);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [routes, certificates, refusals, workers, providers] = await Promise.all(
      ["routes", "certificates", "refusals", "workers", "providers"].map(get));
    showRoutes(routes);
    showCertificates(certificates);
    showRefusals(refusals);
    showWorkers(workers);
    showProviders(providers);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
  } catch (error) {
    // Shown, not thrown: the gateway may be restarting; the next round tries again.
    status.textContent = `not updated: ${error.message}`;
    status.className = "stale";
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
