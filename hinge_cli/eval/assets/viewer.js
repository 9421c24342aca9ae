// hinge view: draws one prediction's spots over its tissue on a canvas. Plain JavaScript, no libraries.
// The numbers arrive gzipped and base64-coded (see hinge_cli/eval/viewer.py): x and y as float32, then for each
// layer one uint8 code per gene and spot, gene by gene, each stored as its difference from the spot before (mod 256);
// code 255 is a missing value, 0..254 span [lo, hi] of the gene.
"use strict";
(async function () {
  const MISSING = 255;
  const meta = JSON.parse(document.getElementById("hinge-meta").textContent);
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d"), stage = $("stage");
  const api = { ready: false, drawn: 0, errors: [] };
  window.hinge = api;

  async function unpack() {
    const text = $("hinge-blob").textContent.trim();
    const response = await fetch("data:application/gzip;base64," + text);
    const stream = response.body.pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  const bytes = await unpack();
  const n = meta.n, genes = meta.genes, g = genes.length;
  const xs = new Float32Array(bytes.buffer, 0, n), ys = new Float32Array(bytes.buffer, 4 * n, n);
  const layers = meta.layers.map((layer, k) => ({ ...layer, codes: bytes.subarray(8 * n + k * g * n, 8 * n + (k + 1) * g * n) }));
  const geneIndex = new Map(genes.map((name, j) => [name, j]));

  const state = { gene: 0, layer: 0, clip: 0, opacity: 0.85, tissue: true, k: 1, x: 0, y: 0 };
  let image = null;
  if (meta.image) {
    image = new Image();
    image.src = meta.image.src;
    await image.decode();
  }
  if (meta.imageNote) { $("note").textContent = meta.imageNote; $("note").style.display = "block"; }

  // ---------------------------------------------------------------- values and colours
  const layer = () => layers[state.layer];
  const decoded = new Map();
  function codesOf(l, j) {
    // stored as differences from the spot before (mod 256): a running sum gives the codes back, once per layer and gene
    const key = `${l.key}/${j}`;
    if (!decoded.has(key)) {
      const delta = l.codes.subarray(j * n, (j + 1) * n), codes = new Uint8Array(n);
      let running = 0;
      for (let i = 0; i < n; i++) { running = (running + delta[i]) & 255; codes[i] = running; }
      decoded.set(key, codes);
    }
    return decoded.get(key);
  }
  const valueOfCode = (l, j, code) => code === MISSING ? NaN : l.lo[j] + (code / (MISSING - 1)) * (l.hi[j] - l.lo[j]);
  function valueAt(l, j, i) { return valueOfCode(l, j, codesOf(l, j)[i]); }

  function scale() {
    // the colour range, in codes and in the layer's units: the gene's range, or percentiles of it; symmetric about 0 for errors
    const l = layer(), j = state.gene, codes = codesOf(l, j);
    let cLo = 0, cHi = MISSING - 1;
    if (state.clip > 0) {
      const present = Array.from(codes).filter((c) => c !== MISSING).sort((a, b) => a - b);
      if (present.length) {
        const at = (q) => present[Math.min(present.length - 1, Math.max(0, Math.round(q * (present.length - 1))))];
        cLo = at(state.clip / 100); cHi = at(1 - state.clip / 100);
      }
    }
    let lo = valueOfCode(l, j, cLo), hi = valueOfCode(l, j, cHi);
    if (l.diverging) { const m = Math.max(Math.abs(lo), Math.abs(hi)); lo = -m; hi = m; }
    return { lo, hi };
  }
  function colourIndex(value, s) {
    if (!Number.isFinite(value)) return -1;
    const t = s.hi > s.lo ? (value - s.lo) / (s.hi - s.lo) : 0.5;
    return Math.max(0, Math.min(255, Math.round(t * 255)));
  }
  const palette = () => (layer().diverging ? meta.colours.diverging : meta.colours.sequential);

  // ---------------------------------------------------------------- drawing
  function resize() {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(stage.clientWidth * ratio);
    canvas.height = Math.round(stage.clientHeight * ratio);
  }
  function extent() {
    if (image) return { w: meta.image.width, h: meta.image.height, x0: 0, y0: 0 };
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) { x0 = Math.min(x0, xs[i]); y0 = Math.min(y0, ys[i]); x1 = Math.max(x1, xs[i]); y1 = Math.max(y1, ys[i]); }
    const r = meta.radius;
    return { w: x1 - x0 + 4 * r, h: y1 - y0 + 4 * r, x0: x0 - 2 * r, y0: y0 - 2 * r };
  }
  function fit() {
    const e = extent(), ratio = window.devicePixelRatio || 1;
    state.k = Math.min(canvas.width / e.w, canvas.height / e.h) * 0.96;
    state.x = (canvas.width - e.w * state.k) / 2 - e.x0 * state.k;
    state.y = (canvas.height - e.h * state.k) / 2 - e.y0 * state.k;
    state.ratio = ratio;
  }
  function draw() {
    const s = scale(), l = layer(), j = state.gene, colours = palette();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(state.k, 0, 0, state.k, state.x, state.y);
    if (image && state.tissue) ctx.drawImage(image, 0, 0);
    const paths = Array.from({ length: 256 }, () => null), r = meta.radius, codes = codesOf(l, j);
    let drawn = 0;
    for (let i = 0; i < n; i++) {
      const c = colourIndex(valueOfCode(l, j, codes[i]), s);
      if (c < 0) continue;
      const path = paths[c] || (paths[c] = new Path2D());
      path.moveTo(xs[i] + r, ys[i]);
      path.arc(xs[i], ys[i], r, 0, 2 * Math.PI);
      drawn++;
    }
    ctx.globalAlpha = state.opacity;
    paths.forEach((path, c) => { if (path) { ctx.fillStyle = colours[c]; ctx.fill(path); } });
    ctx.globalAlpha = 1;
    api.drawn = drawn;
    drawBar(s, l, colours);
  }
  const fmt = (v) => (!Number.isFinite(v) ? "n/a" : Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
  function drawBar(s, l, colours) {
    const bar = $("bar-canvas"), b = bar.getContext("2d");
    colours.forEach((c, k) => { b.fillStyle = c; b.fillRect((k * bar.width) / 256, 0, bar.width / 256 + 1, bar.height); });
    $("bar-title").textContent = `${genes[state.gene]} · ${l.label} · ${meta.units}`;
    $("bar-lo").textContent = fmt(s.lo); $("bar-mid").textContent = fmt((s.lo + s.hi) / 2); $("bar-hi").textContent = fmt(s.hi);
    api.range = [s.lo, s.hi];
  }

  // ---------------------------------------------------------------- hover: the nearest spot within its radius
  const cell = Math.max(meta.radius * 2, 1), grid = new Map();
  for (let i = 0; i < n; i++) {
    const key = `${Math.floor(xs[i] / cell)},${Math.floor(ys[i] / cell)}`;
    (grid.get(key) || grid.set(key, []).get(key)).push(i);
  }
  function spotAt(px, py) {
    const gx = Math.floor(px / cell), gy = Math.floor(py / cell);
    let best = -1, bestD = meta.radius * meta.radius;
    for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
      for (const i of grid.get(`${gx + dx},${gy + dy}`) || []) {
        const d = (xs[i] - px) ** 2 + (ys[i] - py) ** 2;
        if (d <= bestD) { best = i; bestD = d; }
      }
    }
    return best;
  }
  const toImage = (event) => {
    const rect = canvas.getBoundingClientRect(), ratio = canvas.width / rect.width;
    return [((event.clientX - rect.left) * ratio - state.x) / state.k, ((event.clientY - rect.top) * ratio - state.y) / state.k];
  };
  function readout(i) {
    const j = state.gene, lines = [`spot ${meta.barcodes[i]}`, `${genes[j]} (${meta.units})`];
    for (const l of layers) {
      if (["prediction", "std", "truth", "error"].includes(l.key) || l === layer()) lines.push(`${l.label}: ${fmt(valueAt(l, j, i))}`);
    }
    return lines.join("\n");
  }

  // ---------------------------------------------------------------- zoom and pan
  let drag = null;
  stage.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, sx: state.x, sy: state.y }; stage.classList.add("dragging"); });
  window.addEventListener("mouseup", () => { drag = null; stage.classList.remove("dragging"); });
  stage.addEventListener("mousemove", (e) => {
    const ratio = canvas.width / canvas.getBoundingClientRect().width;
    if (drag) { state.x = drag.sx + (e.clientX - drag.x) * ratio; state.y = drag.sy + (e.clientY - drag.y) * ratio; draw(); return; }
    const [px, py] = toImage(e), i = spotAt(px, py), hover = $("hover");
    if (i < 0) { hover.style.display = "none"; return; }
    const rect = stage.getBoundingClientRect();
    hover.textContent = readout(i);
    hover.style.left = `${e.clientX - rect.left + 14}px`; hover.style.top = `${e.clientY - rect.top + 14}px`;
    hover.style.display = "block";
  });
  stage.addEventListener("mouseleave", () => { $("hover").style.display = "none"; });
  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    const rect = canvas.getBoundingClientRect(), ratio = canvas.width / rect.width;
    const cx = (e.clientX - rect.left) * ratio, cy = (e.clientY - rect.top) * ratio, f = Math.exp(-e.deltaY * 0.0015);
    state.x = cx - (cx - state.x) * f; state.y = cy - (cy - state.y) * f; state.k *= f;
    draw();
  }, { passive: false });

  // ---------------------------------------------------------------- controls
  const geneInput = $("gene"), list = $("matches");
  let matches = [], active = 0;
  function search(text) {
    const q = text.trim().toLowerCase();
    if (!q) return [];
    const starts = [], contains = [];
    genes.forEach((name, j) => { const low = name.toLowerCase(); if (low.startsWith(q)) starts.push(j); else if (low.includes(q)) contains.push(j); });
    return starts.concat(contains).slice(0, 60);
  }
  function showMatches() {
    list.innerHTML = "";
    matches.forEach((j, k) => {
      const li = document.createElement("li");
      li.textContent = genes[j]; li.className = k === active ? "active" : ""; li.setAttribute("role", "option");
      li.addEventListener("mousedown", (e) => { e.preventDefault(); pick(genes[j]); });
      list.appendChild(li);
    });
    list.style.display = matches.length ? "block" : "none";
    const current = list.children[active];
    if (current) current.scrollIntoView({ block: "nearest" });
  }
  function pick(name) {
    if (!geneIndex.has(name)) return false;
    state.gene = geneIndex.get(name);
    geneInput.value = name; matches = []; showMatches();
    api.gene = name;
    draw();
    return true;
  }
  geneInput.addEventListener("input", () => {
    matches = search(geneInput.value); active = 0; showMatches();
    if (geneIndex.has(geneInput.value.trim())) pick(geneInput.value.trim());
  });
  geneInput.addEventListener("keydown", (e) => {
    if (e.key === "ArrowDown" && matches.length) { active = (active + 1) % matches.length; showMatches(); e.preventDefault(); }
    else if (e.key === "ArrowUp" && matches.length) { active = (active - 1 + matches.length) % matches.length; showMatches(); e.preventDefault(); }
    else if (e.key === "Enter") { if (matches.length) pick(genes[matches[active]]); else pick(geneInput.value.trim()); e.preventDefault(); }
    else if (e.key === "Escape") { matches = []; showMatches(); }
  });
  const layerSelect = $("layer");
  layers.forEach((l, k) => { const o = document.createElement("option"); o.value = k; o.textContent = l.label; layerSelect.appendChild(o); });
  function setLayer(key) { const k = layers.findIndex((l) => l.key === key); if (k < 0) return false; state.layer = k; layerSelect.value = k; api.layer = key; draw(); return true; }
  layerSelect.addEventListener("change", () => setLayer(layers[+layerSelect.value].key));
  $("clip").addEventListener("change", (e) => { state.clip = +e.target.value; draw(); });
  const opacity = $("opacity");
  opacity.addEventListener("input", () => { state.opacity = +opacity.value; $("opacity-value").textContent = `${Math.round(state.opacity * 100)}%`; draw(); });
  $("fit").addEventListener("click", () => { fit(); draw(); });
  $("tissue").addEventListener("click", (e) => { state.tissue = !state.tissue; e.target.textContent = state.tissue ? "Hide tissue" : "Show tissue"; draw(); });
  window.addEventListener("resize", () => { resize(); fit(); draw(); });

  // ---------------------------------------------------------------- the side panel's facts, and eval's report
  const facts = $("facts");
  for (const [title, rows] of Object.entries(meta.facts)) {
    const h = document.createElement("h2"); h.textContent = title; facts.appendChild(h);
    const table = document.createElement("table"); table.className = "facts";
    for (const [name, value] of Object.entries(rows)) {
      const tr = table.insertRow(); tr.insertCell().textContent = name; tr.insertCell().textContent = value;
    }
    facts.appendChild(table);
  }
  document.querySelectorAll("#report table.sortable").forEach((table) => {
    table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
      const body = table.tBodies[0], rows = Array.from(body.rows), down = th.dataset.order !== "desc";
      const key = (row) => { const t = row.cells[col].textContent, v = parseFloat(t); return Number.isNaN(v) ? t : v; };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (down ? -1 : 1); });
      th.dataset.order = down ? "desc" : "asc"; rows.forEach((row) => body.appendChild(row));
    }));
  });
  document.querySelectorAll("#report tr.gene").forEach((row) => row.addEventListener("click", () => {
    pick(row.dataset.gene); $("viewer").scrollIntoView({ behavior: "smooth" });
  }));

  $("title").textContent = meta.title;
  $("units").textContent = `values in ${meta.units}`;
  $("opacity-value").textContent = "85%";
  Object.assign(api, {
    pick, setLayer, genes, layers: layers.map((l) => l.key),
    value: (i) => valueAt(layer(), state.gene, i),
    colour: (i) => { const c = colourIndex(valueAt(layer(), state.gene, i), scale()); return c < 0 ? null : palette()[c]; },
    screen: (i) => { const rect = canvas.getBoundingClientRect(), ratio = canvas.width / rect.width;
      return [(xs[i] * state.k + state.x) / ratio, (ys[i] * state.k + state.y) / ratio]; },
  });
  resize(); fit(); pick(genes[0]);
  $("status").textContent = `${n.toLocaleString()} spots · ${g} genes`;
  api.ready = true;
})().catch((error) => { (window.hinge = window.hinge || {}).failed = String(error); console.error(error); });
