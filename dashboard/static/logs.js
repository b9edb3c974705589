// Gremlin dashboard: the live tail of the log page, over server-sent events.
"use strict";

(() => {
  const table = document.getElementById("log-table");
  const rows = document.getElementById("log-rows");
  const status = document.getElementById("live-status");
  const toggle = document.getElementById("live-toggle");
  if (!table || !rows || !status || !toggle) {
    return;
  }
  const MAX_ROWS = 2000;
  let source = null;

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) {
      td.className = className;
    }
    td.textContent = text; // text, never HTML: a log line may hold anything
    return td;
  }

  function messageCell(record) {
    const td = cell("", "");
    const message = document.createElement("span");
    message.className = "message";
    message.textContent = record.message;
    td.appendChild(message);
    if (record.corrupt) {
      const why = document.createElement("span");
      why.className = "muted";
      why.textContent = ` [${record.file}: ${record.fields.reason}]`;
      td.appendChild(why);
    }
    for (const [key, value] of record.shown_fields || []) {
      const field = document.createElement("span");
      field.className = "field";
      const k = document.createElement("span");
      k.className = "key";
      k.textContent = key;
      field.appendChild(k);
      field.appendChild(document.createTextNode(`=${value}`));
      td.appendChild(field);
    }
    return td;
  }

  function addRecord(record) {
    const tr = document.createElement("tr");
    const level = (record.level || "corrupt").toLowerCase();
    tr.className = `log-row live level-${level.replace(/[^a-z]/g, "")}${record.corrupt ? " corrupt" : ""}`;
    tr.appendChild(cell((record.time || "").slice(0, 19).replace("T", " "), "nowrap"));
    tr.appendChild(cell(record.level || "CORRUPT", ""));
    tr.appendChild(cell(record.component || "", ""));
    tr.appendChild(messageCell(record));
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > MAX_ROWS) {
      rows.removeChild(rows.lastChild);
    }
    const empty = document.getElementById("logs-empty");
    if (empty) {
      empty.remove();
    }
  }

  function start() {
    source = new EventSource(table.dataset.streamUrl);
    source.addEventListener("open", () => { status.textContent = "live: new records appear at the top"; });
    source.addEventListener("record", (event) => { addRecord(JSON.parse(event.data)); });
    source.addEventListener("end", () => { stop("the dashboard stopped; reload to reconnect"); });
    source.addEventListener("error", () => {
      if (source && source.readyState === EventSource.CLOSED) {
        stop("live tail unavailable (too many open, or logged out); reload to try again");
      } else {
        status.textContent = "reconnecting…";
      }
    });
    toggle.textContent = "Pause live tail";
    toggle.setAttribute("aria-pressed", "true");
  }

  function stop(message) {
    if (source) {
      source.close();
      source = null;
    }
    status.textContent = message;
    toggle.textContent = "Resume live tail";
    toggle.setAttribute("aria-pressed", "false");
  }

  toggle.addEventListener("click", () => { if (source) { stop("paused"); } else { start(); } });
  window.addEventListener("pagehide", () => { if (source) { source.close(); } });
  start();
})();
