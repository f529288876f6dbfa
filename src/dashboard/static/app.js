// The dashboard: renders /api/status, then every state the server pushes
// on /api/events (server-sent events). No libraries: the chart is SVG.
"use strict";

let deadline = null;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function megabytes(bytes) {
  return (bytes / 1e6).toFixed(2) + " MB";
}

function line(points, scaleX, scaleY, color, cls) {
  if (points.length === 0) return "";
  const d = points.map(([x, y], i) => (i ? "L" : "M") + scaleX(x).toFixed(1) + "," + scaleY(y).toFixed(1)).join(" ");
  const dots = points.map(([x, y]) => `<circle class="${cls}" cx="${scaleX(x).toFixed(1)}" cy="${scaleY(y).toFixed(1)}" r="3" fill="${color}"/>`).join("");
  return `<path class="${cls}" d="${d}" fill="none" stroke="${color}" stroke-width="2"/>${dots}`;
}

function chart(history) {
  const svg = document.getElementById("chart");
  const [w, h, left, right, top, bottom] = [640, 240, 44, 44, 12, 28];
  const rounds = history.map((p) => p.round);
  const losses = history.flatMap((p) => [p.train_loss, p.eval_loss]).filter((v) => v !== null && v !== undefined);
  if (rounds.length === 0 || losses.length === 0) {
    svg.innerHTML = `<text x="${w / 2}" y="${h / 2}" text-anchor="middle" fill="#5b6478">waiting for the first round</text>`;
    return;
  }
  const [x0, x1] = [Math.min(...rounds), Math.max(...rounds, Math.min(...rounds) + 1)];
  const [y0, y1] = [Math.min(...losses) * 0.95, Math.max(...losses) * 1.05];
  const scaleX = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - right);
  const scaleY = (y) => top + (1 - (y - y0) / (y1 - y0 || 1)) * (h - top - bottom);
  const scaleEm = (v) => top + (1 - v) * (h - top - bottom);
  const pick = (key) => history.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => [p.round, p[key]]);
  let axes = `<line x1="${left}" y1="${h - bottom}" x2="${w - right}" y2="${h - bottom}" stroke="#999"/>`;
  for (const r of rounds) axes += `<text x="${scaleX(r)}" y="${h - 10}" font-size="10" text-anchor="middle">${r}</text>`;
  axes += `<text x="4" y="${top + 8}" font-size="10">${y1.toFixed(2)}</text><text x="4" y="${h - bottom}" font-size="10">${y0.toFixed(2)}</text>`;
  axes += `<text x="${w - 4}" y="${top + 8}" font-size="10" text-anchor="end">100%</text><text x="${w - 4}" y="${h - bottom}" font-size="10" text-anchor="end">0%</text>`;
  svg.innerHTML = axes + line(pick("train_loss"), scaleX, scaleY, "#2f6fd6", "train") + line(pick("eval_loss"), scaleX, scaleY, "#d6512f", "eval") + line(pick("exact_match"), scaleX, scaleEm, "#2a9d55", "em");
}

function peers(rows) {
  const body = document.querySelector("#peers tbody");
  body.innerHTML = "";
  for (const p of rows) {
    const tr = document.createElement("tr");
    for (const value of [p.peer, p.round ?? "–", p.rows ?? "–", p.state, p.path ?? "–"]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function render(s) {
  text("mode", s.mode === "simulation" ? "simulation" : "node");
  text("run", "run " + s.run_id + (s.finished ? " · finished" : ""));
  text("round", `${Math.min(s.round, s.rounds)} / ${s.rounds}`);
  text("agreement", s.agreement === null || s.agreement === undefined ? "–" : s.agreement.toFixed(2));
  text("certified", s.certified ?? "none yet");
  text("traffic", megabytes(s.bytes_sent) + " / " + megabytes(s.bytes_received));
  const reasons = Object.entries(s.rejected_by_reason || {});
  text("rejected", reasons.reduce((sum, [, n]) => sum + n, 0));
  const quarantined = Object.entries(s.quarantined || {});
  text("reasons", reasons.map(([reason, n]) => `${n} ${reason}`).join(", ") + (quarantined.length ? ` · quarantined: ${quarantined.map(([peer, why]) => `${peer.slice(-8)} (${why})`).join(", ")}` : ""));
  deadline = s.deadline_unix_ms ?? null;
  if (deadline === null) text("countdown", s.finished ? "done" : "when peers are in");
  chart(s.history || []);
  peers(s.peers || []);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

setInterval(() => {
  if (deadline !== null) {
    const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
    text("countdown", left + " s");
  }
}, 1000);

fetch("/api/status").then((r) => r.json()).then(render).catch(() => text("run", "no answer from /api/status"));
const events = new EventSource("/api/events");
events.onmessage = (e) => render(JSON.parse(e.data));
