// runner's web view: live updates over Server-Sent Events, no framework. Pages work without it (reload shows
// the same); with it, a change's tree, a step's log and the changes list's badges follow the runner live.
"use strict";

// A region that re-renders itself from `data-src` whenever its `data-events` stream says something happened.
function liveRegion(region) {
  const source = new EventSource(region.dataset.events);
  let pending = null;
  const refresh = () => {
    pending = null;
    fetch(region.dataset.src, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => { if (html !== null) { region.innerHTML = html; } });
  };
  source.addEventListener("update", () => { if (!pending) { pending = setTimeout(refresh, 150); } });
  source.addEventListener("end", () => { source.close(); setTimeout(refresh, 50); });
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) { refresh(); } };
}

// A step's log: lines are appended as they come; phases likewise.
function liveLog(log) {
  const source = new EventSource(log.dataset.events);
  const phases = document.getElementById("phases");
  const follow = document.getElementById("follow");
  source.addEventListener("log", (e) => {
    const data = JSON.parse(e.data);
    const target = document.getElementById(data.service ? "service-log" : "log");
    if (!target) { return; }
    const line = document.createElement("span");
    line.className = data.stream;
    line.textContent = data.line + "\n";
    target.appendChild(line);
    if (!follow || follow.checked) { target.scrollTop = target.scrollHeight; }
  });
  source.addEventListener("phase", (e) => {
    if (!phases) { return; }
    const item = document.createElement("li");
    item.textContent = JSON.parse(e.data).text;
    phases.appendChild(item);
  });
  source.addEventListener("end", () => {
    source.close();
    const facts = document.getElementById("step-facts");
    if (facts && facts.dataset.src) {
      fetch(facts.dataset.src, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : null))
        .then((html) => { if (html !== null) { facts.outerHTML = html; } });
    }
  });
}

// The same symbols as the server's badges (src/web/layout.rs), so a state reads without colour.
const SYMBOLS = { success: "✔", error: "✘", cancelled: "⊘", aborted: "⊘", running: "▶", queued: "…" };

// The changes list: badges of unfinished changes follow their state.
function liveBadges(table) {
  const source = new EventSource(table.dataset.events);
  source.addEventListener("state", (e) => {
    const data = JSON.parse(e.data);
    const cell = document.querySelector('[data-change="' + data.id + '"] .badge');
    if (cell) {
      cell.dataset.state = data.state;
      cell.firstElementChild.textContent = (SYMBOLS[data.state] || "○") + " ";
      cell.lastChild.textContent = data.state;
    }
  });
  source.addEventListener("end", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live=region]").forEach(liveRegion);
  document.querySelectorAll("[data-live=log]").forEach(liveLog);
  document.querySelectorAll("[data-live=badges]").forEach(liveBadges);
});
