// Live alerts: the latest alerts from /v1/alerts, then new ones from the SSE stream, newest first.
"use strict";

(() => {
  const { el, api } = Viewer;
  const body = document.getElementById("alerts-body");
  const state = document.getElementById("stream-state");
  const live = document.getElementById("alerts-live");
  const minSeverity = document.getElementById("min-severity");
  const MAX_ROWS = 200;
  const seen = new Set();
  let source = null;

  function row(a, fresh) {
    const when = (a.created_at || "").replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "").replace("Z", "");
    const text = a.text ? (a.text.length > 120 ? a.text.slice(0, 119) + "…" : a.text) : "";
    return el("tr", { class: fresh ? "new" : null, "data-alert-id": a.id, "data-rule": a.rule_id },
      el("td", {}, when),
      el("td", {}, el("span", { class: "sev sev-" + a.severity }, a.severity)),
      el("td", {}, el("span", { title: a.description || "" }, a.rule_id)),
      el("td", {}, a.category),
      el("td", {}, a.policy_name),
      el("td", {}, a.source),
      el("td", {}, a.request_id || ""),
      el("td", {}, text));
  }

  function clearEmpty() {
    const empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
  }

  function add(a, fresh) {
    if (seen.has(a.id)) return;
    seen.add(a.id);
    clearEmpty();
    if (fresh) {
      body.prepend(row(a, true));
      live.textContent = "New " + a.severity + " alert: " + a.rule_id + " (" + a.category + ")";
    } else {
      body.append(row(a, false));
    }
    while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
  }

  function params() {
    const p = new URLSearchParams();
    if (minSeverity.value) p.set("min_severity", minSeverity.value);
    return p;
  }

  async function load() {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 8 }, "No alerts yet.")));
    seen.clear();
    const p = params();
    p.set("limit", "50");
    try {
      const page = await api("/v1/alerts?" + p.toString());
      for (const a of page.alerts) add(a, false);
    } catch (err) {
      state.textContent = "could not load alerts: " + err.message;
    }
  }

  function connect() {
    if (source) source.close();
    source = new EventSource("/v1/alerts/stream?" + params().toString());
    state.textContent = "connecting…";
    source.onopen = () => { state.textContent = "live"; state.className = "badge verdict-allow"; };
    source.onerror = () => { state.textContent = "reconnecting…"; state.className = "badge verdict-alert"; };
    source.addEventListener("alert", (ev) => {
      try { add(JSON.parse(ev.data), true); } catch (_) { /* a malformed event is skipped */ }
    });
  }

  minSeverity.addEventListener("change", async () => { await load(); connect(); });
  load().then(connect);
  window.addEventListener("beforeunload", () => { if (source) source.close(); });
})();
