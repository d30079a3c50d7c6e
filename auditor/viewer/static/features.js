// Features page: live search (re-renders the server's own result table), "/" to search, arrow keys in results.
"use strict";

(() => {
  const form = document.getElementById("feature-search");
  const q = document.getElementById("q");
  const category = document.getElementById("category");
  const table = document.getElementById("feature-table");
  const count = document.getElementById("result-count");
  if (!form || !table) return;

  let timer = null;
  let seq = 0;
  async function refresh() {
    const params = new URLSearchParams({ q: q.value, category: category.value });
    const mine = ++seq;
    const resp = await fetch("/ui/features?" + params.toString());
    if (!resp.ok || mine !== seq) return;
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    const body = doc.querySelector("#feature-table tbody");
    const status = doc.getElementById("result-count");
    if (body) table.tBodies[0].replaceWith(document.adoptNode(body));
    if (status) count.textContent = status.textContent;
    history.replaceState(null, "", "/ui/features?" + params.toString());
  }
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 150);
  }
  q.addEventListener("input", schedule);
  category.addEventListener("change", schedule);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); clearTimeout(timer); refresh(); });

  function links() { return Array.from(table.querySelectorAll("a.feature-link")); }

  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    const typing = t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement;
    if (ev.key === "/" && !typing) {
      ev.preventDefault();
      q.focus();
      q.select();
      return;
    }
    if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
    const all = links();
    if (!all.length) return;
    if (t === q && ev.key === "ArrowDown") {
      ev.preventDefault();
      all[0].focus();
      return;
    }
    const i = all.indexOf(t);
    if (i < 0) return;
    ev.preventDefault();
    if (ev.key === "ArrowDown" && i + 1 < all.length) all[i + 1].focus();
    else if (ev.key === "ArrowUp") (i > 0 ? all[i - 1] : q).focus();
  });
})();
