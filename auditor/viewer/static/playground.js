// Audit playground: POST /v1/audit with explain, verdict + matched rules + token heat map; steered vs default generation.
"use strict";

(() => {
  const { el, api, fmt, level, tokenNav } = Viewer;
  const form = document.getElementById("audit-form");
  const input = document.getElementById("input");
  const policy = document.getElementById("policy");
  const button = document.getElementById("audit-button");
  const status = document.getElementById("audit-status");
  const result = document.getElementById("result");
  const verdict = document.getElementById("verdict");
  const verdictMeta = document.getElementById("verdict-meta");
  const matchesBody = document.querySelector("#matches tbody");
  const heatSelect = document.getElementById("heat-feature");
  const heatmap = document.getElementById("heatmap");
  const wanted = form.dataset.feature || "";

  let names = new Map(); // feature name -> latent index (from the library)
  let last = null; // last audit response
  let triggered = new Set(); // token positions inside fired spans of matched rules
  let lastInput = null; // the audited input, for per-latent activations
  const heatCache = new Map(); // latent -> Map(position -> activation)

  const namesReady = api("/v1/features").then((lib) => {
    names = new Map(lib.features.map((f) => [f.name, f.index]));
  }).catch(() => { /* no library: the heat map offers latent indices only */ });

  function kind() {
    return form.querySelector("input[name=kind]:checked").value;
  }

  /** A chat from a JSON list of messages or from "role: content" lines. */
  function parseChat(text) {
    const trimmed = text.trim();
    if (trimmed.startsWith("[")) {
      const msgs = JSON.parse(trimmed);
      if (!Array.isArray(msgs)) throw new Error("a JSON chat must be a list of {role, content}");
      return msgs;
    }
    const msgs = [];
    for (const line of text.split("\n")) {
      const m = /^\s*(system|user|assistant)\s*:\s?(.*)$/i.exec(line);
      if (m) msgs.push({ role: m[1].toLowerCase(), content: m[2] });
      else if (msgs.length) msgs[msgs.length - 1].content += "\n" + line;
      else if (line.trim()) msgs.push({ role: "user", content: line });
    }
    if (!msgs.length) throw new Error("write at least one turn, e.g. 'user: hello'");
    return msgs;
  }

  function requestBody() {
    const body = { explain: true };
    if (policy && policy.value) body.policy = policy.value;
    if (kind() === "chat") body.messages = parseChat(input.value);
    else body.text = input.value;
    return body;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let body;
    try { body = requestBody(); } catch (err) { status.textContent = "Input problem: " + err.message; return; }
    button.disabled = true;
    status.textContent = "Auditing…";
    try {
      await namesReady;
      last = await api("/v1/audit", { method: "POST", body });
      lastInput = Object.assign({}, body);
      delete lastInput.explain;
      delete lastInput.policy;
      heatCache.clear();
      await render(last);
      status.textContent = "Verdict: " + last.verdict + " (" + last.matches.length + " rule" + (last.matches.length === 1 ? "" : "s") + " matched)";
    } catch (err) {
      status.textContent = "Audit failed: " + err.message;
    } finally {
      button.disabled = false;
    }
  });

  function render(out) {
    result.hidden = false;
    verdict.textContent = out.verdict;
    verdict.className = "badge verdict-" + out.verdict;
    verdictMeta.textContent = "policy " + (out.policy || "none") + " · " + out.n_tokens + " tokens" + (out.truncated ? " (truncated)" : "");
    triggered = new Set();
    matchesBody.replaceChildren();
    const leafNames = [];
    for (const m of out.matches) {
      const evidence = el("ul", { class: "evidence" });
      for (const leaf of m.explanation || []) {
        if (!leaf.fired) continue;
        leafNames.push(leaf.name);
        for (const [a, b] of leaf.token_spans || []) for (let p = a; p < b; p++) triggered.add(p);
        const spans = (leaf.span_texts || []).map((s) => "“" + s + "”").join(", ");
        evidence.append(el("li", {}, leaf.name + " " + leaf.agg + " " + fmt(leaf.value) + " ≥ " + fmt(leaf.threshold) + (spans ? " on " + spans : "")));
      }
      matchesBody.append(el("tr", { "data-rule": m.rule_id },
        el("td", {}, el("span", { title: m.description || "" }, m.rule_id)),
        el("td", {}, el("span", { class: "sev sev-" + m.severity }, m.severity)),
        el("td", {}, m.category),
        el("td", { class: "num" }, fmt(m.score)),
        el("td", {}, (m.actions || []).join(", ")),
        el("td", {}, evidence)));
    }
    if (!out.matches.length) matchesBody.append(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No rule matched.")));
    fillFeatures(out, leafNames);
    return drawHeat();
  }

  /** Feature choices: the matched rules' features, then the strongest features here, then the rest of the library. */
  function fillFeatures(out, leafNames) {
    const seen = new Map(); // index -> strongest activation among the tokens' top features
    for (const t of out.tokens || []) {
      for (const f of t.features) seen.set(f.index, Math.max(seen.get(f.index) || 0, f.activation));
    }
    const byIndex = new Map(Array.from(names.entries()).map(([n, i]) => [i, n]));
    const label = (i) => (byIndex.has(i) ? byIndex.get(i) + " " : "") + "#" + i + (seen.has(i) ? " · top " + fmt(seen.get(i)) : "");
    const used = new Set();
    const groups = [];
    const group = (title, list) => {
      const keep = list.filter((i) => i !== undefined && !used.has(i));
      keep.forEach((i) => used.add(i));
      if (keep.length) groups.push([title, keep]);
    };
    const want = /^\d+$/.test(wanted) ? Number(wanted) : names.get(wanted);
    group("Asked for", want === undefined ? [] : [want]);
    group("Matched rules", leafNames.map((n) => names.get(n)));
    group("Strongest here", Array.from(seen.entries()).sort((a, b) => b[1] - a[1]).map(([i]) => i));
    group("Library", Array.from(byIndex.keys()).sort((a, b) => a - b));
    heatSelect.replaceChildren(...groups.map(([title, list]) => el("optgroup", { label: title }, ...list.map((i) => el("option", { value: i }, label(i))))));
  }

  async function valuesFor(idx) {
    if (!heatCache.has(idx)) {
      const r = await api("/ui/api/activations", { method: "POST", body: Object.assign({}, lastInput, { latents: [idx] }) });
      const vals = r.latents[String(idx)];
      heatCache.set(idx, new Map(r.tokens.map((t, k) => [t.position, vals[k]])));
    }
    return heatCache.get(idx);
  }

  async function drawHeat() {
    if (!last || heatSelect.value === "") { heatmap.replaceChildren(); return; }
    const idx = Number(heatSelect.value);
    let values;
    try {
      values = await valuesFor(idx);
    } catch (err) {
      status.textContent = "Heat map failed: " + err.message;
      values = new Map();
    }
    if (Number(heatSelect.value) !== idx) return; // the choice changed while loading
    const tokens = last.tokens || [];
    const acts = tokens.map((t) => values.get(t.position) || 0);
    const top = Math.max(0, ...acts);
    heatmap.replaceChildren(...tokens.map((t, k) => {
      const trig = triggered.has(t.position);
      const strongest = t.features.map((f) => (f.name || "#" + f.index) + " " + fmt(f.activation)).join(", ");
      const title = "#" + idx + " " + fmt(acts[k]) + (strongest ? " · strongest: " + strongest : "") + (trig ? " · triggered a rule" : "");
      return el("span", {
        class: "tok lv" + level(acts[k], top) + (trig ? " trig" : ""),
        "data-position": t.position,
        "data-activation": acts[k],
        title,
      }, t.token);
    }));
    heatmap.dataset.latent = String(idx);
    heatNav.reset();
  }
  heatSelect.addEventListener("change", drawHeat);
  const heatNav = tokenNav(heatmap, document.getElementById("heat-readout"));

  // ------------------------------------------------------------ steering
  const toggle = document.getElementById("steer-toggle");
  const panel = document.getElementById("steer-panel");
  const steerButton = document.getElementById("steer-button");
  const steerStatus = document.getElementById("steer-status");
  const steerResult = document.getElementById("steer-result");
  toggle.addEventListener("change", () => {
    panel.hidden = !toggle.checked;
    toggle.setAttribute("aria-expanded", String(toggle.checked));
  });
  /** Completion tokens shaded by the steered feature's activation on each (plain text when no trace). */
  function shade(target, tokens, text, trace) {
    target.replaceChildren();
    if (!tokens || !trace || trace.length !== tokens.length) { target.textContent = text || ""; return; }
    const top = Math.max(0, ...trace);
    tokens.forEach((t, k) => target.append(el("span", { class: "tok lv" + level(trace[k], top), title: fmt(trace[k]) }, t)));
  }

  steerButton.addEventListener("click", async () => {
    const feature = document.getElementById("steer-feature").value;
    if (!feature) { steerStatus.textContent = "The library labels no feature to steer."; return; }
    let body;
    try {
      body = kind() === "chat" ? { messages: parseChat(input.value) } : { prompt: input.value };
    } catch (err) { steerStatus.textContent = "Input problem: " + err.message; return; }
    body.steering = [{ feature, mode: document.getElementById("steer-mode").value, value: Number(document.getElementById("steer-value").value) }];
    body.compare = true;
    body.max_tokens = Number(document.getElementById("steer-tokens").value) || 24;
    const headers = {};
    const tokenInput = document.getElementById("steer-token");
    if (tokenInput && tokenInput.value) headers.Authorization = "Bearer " + tokenInput.value;
    steerButton.disabled = true;
    steerStatus.textContent = "Generating…";
    try {
      const out = await api("/v1/generate", { method: "POST", body, headers });
      const traces = out.feature_traces || {};
      const dtraces = out.default_traces || {};
      const key = Object.keys(traces)[0];
      shade(document.getElementById("steered-text"), out.tokens, out.text, key ? traces[key] : null);
      shade(document.getElementById("default-text"), out.default_tokens, out.default_text, key && dtraces[key] ? dtraces[key] : null);
      steerResult.hidden = false;
      steerStatus.textContent = "Generated " + out.tokens.length + " tokens with " + feature + " " + body.steering[0].mode + " " + body.steering[0].value + (out.steered ? "" : " (the feature never fired, so nothing was steered)") + ".";
    } catch (err) {
      steerStatus.textContent = "Generation failed: " + err.message;
    } finally {
      steerButton.disabled = false;
    }
  });
})();
