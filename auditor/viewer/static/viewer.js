// Shared helpers for the viewer pages (no dependencies, no external requests).
"use strict";

const Viewer = (() => {
  const LEVELS = 8;

  /** Heat level 0..8 of value relative to top (0 when inactive, at least 1 when active). */
  function level(value, top) {
    if (!(value > 0) || !(top > 0)) return 0;
    return Math.max(1, Math.min(LEVELS, Math.ceil((LEVELS * value) / top)));
  }

  /** Build an element: el("td", {class: "num"}, "text", child). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /** fetch JSON; throws Error(message) with the server's error message on failure. */
  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    // Marks the viewer's own requests: with a sign-in session they stand in for the API token.
    opts.headers["X-Auditor-UI"] = "1";
    if (opts.body && typeof opts.body !== "string") {
      opts.body = JSON.stringify(opts.body);
      opts.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (err) {
      throw new Error("the sidecar did not answer (" + err.message + ")");
    }
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) {
      const msg = body && body.error && body.error.message ? body.error.message : resp.status + " " + resp.statusText;
      throw new Error(msg);
    }
    return body;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "—";
    if (x === 0) return "0";
    return Number(x).toPrecision(digits || 3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }

  /**
   * Read a row of heat-map tokens without a pointer: `container` becomes one tab stop, the arrow
   * keys (and Home / End) move between its `.tok` spans, and `readout` (a polite live region) says
   * the current token and its value (the span's title); hovering a token does the same. A row that
   * is redrawn starts again from its first token. Returns `{ reset }` for callers that redraw.
   */
  function tokenNav(container, readout, start) {
    container.tabIndex = 0;
    let active = -1;
    const tokens = () => Array.from(container.querySelectorAll(".tok"));
    function show(i) {
      const all = tokens();
      if (!all.length) return;
      const k = Math.max(0, Math.min(all.length - 1, i));
      for (const t of container.querySelectorAll(".tok.active")) t.classList.remove("active");
      active = k;
      all[k].classList.add("active");
      readout.textContent = "\u201c" + all[k].textContent + "\u201d " + (all[k].getAttribute("title") || "");
    }
    container.addEventListener("focus", () => show(active >= 0 ? active : (start ? start(tokens()) : 0)));
    container.addEventListener("keydown", (e) => {
      const moves = { ArrowRight: active + 1, ArrowLeft: active - 1, Home: 0, End: tokens().length - 1 };
      if (!(e.key in moves)) return;
      e.preventDefault();
      show(moves[e.key]);
    });
    container.addEventListener("mouseover", (e) => {
      const t = e.target.closest(".tok");
      if (t && container.contains(t)) show(tokens().indexOf(t));
    });
    return { reset() { active = -1; readout.textContent = ""; } };
  }

  return { level, el, api, fmt, tokenNav };
})();
