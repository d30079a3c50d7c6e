// Feature page: read each top context's tokens with the keyboard (Viewer.tokenNav).
"use strict";

(() => {
  const readout = document.getElementById("context-readout");
  if (!readout) return;
  const peak = (tokens) => Math.max(0, tokens.findIndex((t) => t.classList.contains("peak")));
  for (const row of document.querySelectorAll("#contexts .tokens")) Viewer.tokenNav(row, readout, peak);
})();
