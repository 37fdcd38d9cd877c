// The attention explorer page: plain JS and canvas, no build step and nothing loaded from elsewhere.
// Flow: pick / upload a photo -> POST /explorer/api/generate (NDJSON stream of tokens) -> click a token ->
// GET /explorer/api/sessions/{sid}/tokens/{k} -> heatmap over the photo, text attention, logit lens.
// Boxes in the answer (the done event's "boxes" / "points", original photo pixels) are drawn over the photo.
"use strict";

const $ = (id) => document.getElementById(id);
const SIDE = 480; // the photo's longer side is drawn this many canvas pixels long (small photos scaled up)

const state = {
  images: [],        // data URLs sent in this session (the gallery)
  selected: -1,      // gallery index, -1: none
  session: null,     // the NDJSON header of the current run
  photo: null,       // HTMLImageElement of the current run's photo
  scale: 1,          // canvas pixels per original photo pixel
  inspection: null,  // the last inspection JSON, arrays decoded
  tokens: [],        // generated tokens {id, text}
  boxes: null,       // the done event's {boxes, points, problems} when the answer held boxes
};

// ---------------------------------------------------------------------------------------------- array decoding
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}

// {"shape", "f16": base64 little-endian float16} -> {shape, data: Float32Array}
function decodeArray(a) {
  const bytes = Uint8Array.from(atob(a.f16), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const data = new Float32Array(bytes.length / 2);
  for (let i = 0; i < data.length; i++) data[i] = halfToFloat(view.getUint16(2 * i, true));
  return { shape: a.shape, data };
}

// Mean over the chosen layer / head of a [L, N, X] array (layer / head: an index or "mean") -> Float32Array [X]
function selectLN(arr, layer, head) {
  const [L, N] = arr.shape, X = arr.data.length / (L * N);
  const ls = layer === "mean" ? [...Array(L).keys()] : [Number(layer)];
  const hs = head === "mean" ? [...Array(N).keys()] : [Number(head)];
  const out = new Float32Array(X);
  for (const l of ls) for (const h of hs) {
    const base = (l * N + h) * X;
    for (let x = 0; x < X; x++) out[x] += arr.data[base + x];
  }
  const n = ls.length * hs.length;
  for (let x = 0; x < X; x++) out[x] /= n;
  return out;
}

// ---------------------------------------------------------------------------------------------- colours
// An inferno-like ramp, dark to bright, so brightness alone orders the values.
const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
              [250, 193, 39], [252, 255, 164]];
function ramp(v) {
  const x = Math.min(Math.max(v, 0), 1) * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2), t = x - i;
  return RAMP[i].map((c, j) => Math.round(c + t * (RAMP[i + 1][j] - c)));
}

function visible(text) {
  return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

// ---------------------------------------------------------------------------------------------- gallery + run
function renderGallery() {
  const g = $("gallery");
  g.innerHTML = "";
  state.images.forEach((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `photo ${i + 1}`;
    img.className = i === state.selected ? "selected" : "";
    img.onclick = () => { state.selected = state.selected === i ? -1 : i; renderGallery(); };
    g.appendChild(img);
  });
}

$("image-input").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.images.push(reader.result);
    state.selected = state.images.length - 1;
    renderGallery();
    setStatus(`photo ready: ${file.name}`);
  };
  reader.readAsDataURL(file);
});

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").style.color = isError ? "#b91c1c" : "";
}

async function run() {
  const question = $("question").value.trim();
  if (!question) { setStatus("type a question first", true); return; }
  const image = state.selected >= 0 ? state.images[state.selected] : null;
  $("run").disabled = true;
  $("answer").innerHTML = "";
  state.tokens = [];
  state.inspection = null;
  state.boxes = null;
  clearInspection();
  renderBoxList();
  setStatus("encoding…");
  try {
    const res = await fetch("/explorer/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, image, max_new_tokens: Number($("max-tokens").value) || 16 }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || body.detail || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim()) await onEvent(JSON.parse(line));
      }
    }
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
  } finally {
    $("run").disabled = false;
  }
}

async function onEvent(ev) {
  if (ev.type === "session") {
    state.session = ev;
    fillSelect($("layer-select"), "mean over layers", ev.layers);
    fillSelect($("head-select"), "mean over heads", ev.heads);
    $("model-info").textContent = `${ev.model} · ${ev.layers} layers × ${ev.heads} heads`;
    setStatus(`prompt: ${ev.prompt_tokens} tokens${ev.grid ? `, photo as ${ev.grid.rows}×${ev.grid.cols} merged tokens` : ""}; generating…`);
    state.photo = null;
    if (ev.image) await loadPhoto(state.images[state.selected]);
    drawAll();
  } else if (ev.type === "token") {
    state.tokens.push(ev);
    const span = document.createElement("span");
    span.className = "token";
    span.dataset.index = ev.index;
    span.textContent = visible(ev.text).replace(/⏎/g, "⏎\n");
    span.title = `token ${ev.index} · id ${ev.id}`;
    span.onclick = () => inspect(ev.index);
    $("answer").appendChild(span);
  } else if (ev.type === "done") {
    if (ev.boxes) {
      state.boxes = { boxes: ev.boxes, points: ev.points || [], problems: ev.box_problems || [] };
      renderBoxList();
      drawAll();
    }
    const found = state.boxes ? ` · ${state.boxes.boxes.length} boxes in the answer` : "";
    setStatus(`${ev.tokens} tokens in ${ev.seconds} s${found} — click a token to see where it looked`);
    $("answer").dataset.done = "1";
  } else if (ev.type === "error") {
    setStatus(`error: ${ev.message}`, true);
  }
}

function fillSelect(sel, meanLabel, n) {
  const keep = sel.value;
  sel.innerHTML = `<option value="mean">${meanLabel}</option>`;
  for (let i = 0; i < n; i++) sel.insertAdjacentHTML("beforeend", `<option value="${i}">${i}</option>`);
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

function loadPhoto(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => { state.photo = img; resolve(); };
    img.onerror = () => resolve();
    img.src = url;
  });
}

// ---------------------------------------------------------------------------------------------- inspection
async function inspect(k) {
  if (!state.session) return;
  document.querySelectorAll(".token").forEach((s) => s.classList.toggle("selected", Number(s.dataset.index) === k));
  setStatus(`inspecting token ${k}…`);
  const res = await fetch(`/explorer/api/sessions/${state.session.session}/tokens/${k}`);
  const body = await res.json();
  if (!res.ok) { setStatus(`error: ${body.error ? body.error.message : res.status}`, true); return; }
  if (body.vision) body.vision.attention = decodeArray(body.vision.attention);
  body.text.attention = decodeArray(body.text.attention);
  state.inspection = body;
  $("inspect-title").textContent = `— token ${k}: “${visible(state.tokens[k] ? state.tokens[k].text : "")}” (read at input column ${body.query_column})`;
  setStatus(`token ${k}: ${body.vision ? `${(100 * body.vision.share).toFixed(1)}% of its attention on the photo` : "no photo"}`);
  drawAll();
  renderText();
  renderLens();
  $("stage").dataset.ready = String(k);
}

function clearInspection() {
  $("text-attention").innerHTML = "";
  $("logit-lens").innerHTML = "";
  $("inspect-title").textContent = "";
  $("legend").textContent = "";
  delete $("stage").dataset.ready;
  delete $("answer").dataset.done;
}

function currentVisionGrid() {
  const ins = state.inspection;
  if (!ins || !ins.vision) return null;
  return selectLN(ins.vision.attention, $("layer-select").value, $("head-select").value);  // [rows * cols]
}

function drawAll() {
  const ev = state.session, photo = $("photo"), heat = $("heatmap"), grid = $("grid"), boxes = $("boxes");
  if (!ev || !ev.image || !state.photo) {
    for (const c of [photo, heat, grid, boxes]) { c.width = 8; c.height = 8; }
    return;
  }
  const { width: W, height: H } = ev.image;
  state.scale = SIDE / Math.max(W, H);
  const cw = Math.round(W * state.scale), ch = Math.round(H * state.scale);
  for (const c of [photo, heat, grid, boxes]) { c.width = cw; c.height = ch; }
  photo.getContext("2d").drawImage(state.photo, 0, 0, cw, ch);
  drawHeat(heat);
  if ($("show-grid").checked) drawGrid(grid);
  drawBoxes(boxes);
}

// ---------------------------------------------------------------------------------------------- answer boxes
// One colour per label, in order of first appearance (qwen2vl_jax/grounding/draw.py's PALETTE).
const PALETTE = ["#e15759", "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
                 "#bab0ac"];
// Black or white text, whichever reads better on a "#rrggbb" background (draw.py's rule).
function ink(hex) {
  const n = parseInt(hex.slice(1), 16);
  return 0.299 * (n >> 16) + 0.587 * ((n >> 8) & 255) + 0.114 * (n & 255) > 150 ? "#000" : "#fff";
}

function labelColours() {
  const colours = new Map();
  if (state.boxes) {
    for (const item of [...state.boxes.boxes, ...state.boxes.points]) {
      if (!colours.has(item.label)) colours.set(item.label, PALETTE[colours.size % PALETTE.length]);
    }
  }
  return colours;
}

// The answer's boxes (2-px outlines) and points (dots), each with its label on a filled tag above it (inside the
// box when there is no room above), on their own canvas over the photo: original pixels x the canvas scale.
function drawBoxes(canvas) {
  const ctx = canvas.getContext("2d"), s = state.scale, colours = labelColours();
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.boxes || !$("show-boxes").checked) return;
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "top";
  const tag = (text, x, y, colour) => {
    if (!text) return;
    const w = Math.ceil(ctx.measureText(text).width) + 6, h = 16;
    const tx = Math.max(0, Math.min(x, canvas.width - w)), ty = y - h >= 0 ? y - h : y;
    ctx.fillStyle = colour;
    ctx.fillRect(tx, ty, w, h);
    ctx.fillStyle = ink(colour);
    ctx.fillText(text, tx + 3, ty + 2);
  };
  for (const { label, xyxy: [x1, y1, x2, y2] } of state.boxes.boxes) {
    const colour = colours.get(label);
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.strokeRect(x1 * s + 1, y1 * s + 1, Math.max((x2 - x1) * s - 2, 0), Math.max((y2 - y1) * s - 2, 0));
    tag(label, Math.round(x1 * s), Math.round(y1 * s), colour);
  }
  for (const { label, xy: [x, y] } of state.boxes.points) {
    const colour = colours.get(label);
    ctx.fillStyle = colour;
    ctx.beginPath();
    ctx.arc(x * s, y * s, 4, 0, 2 * Math.PI);
    ctx.fill();
    tag(label, Math.round(x * s) + 5, Math.round(y * s), colour);
  }
}

// The boxes as text (original pixels), and what could not be read as a box.
function renderBoxList() {
  const list = $("box-list"), colours = labelColours();
  list.innerHTML = "";
  delete $("stage").dataset.boxes;
  if (!state.boxes) return;
  const item = (text, colour, cls) => {
    const li = document.createElement("li");
    if (colour) {
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour;
      li.appendChild(swatch);
    }
    li.appendChild(document.createTextNode(text));
    if (cls) li.className = cls;
    list.appendChild(li);
  };
  const px = (values) => values.map((v) => Math.round(v)).join(", ");
  for (const b of state.boxes.boxes) item(`${b.label || "(no label)"}: (${px(b.xyxy)})`, colours.get(b.label));
  for (const p of state.boxes.points) item(`${p.label || "(no label)"}: point (${px(p.xy)})`, colours.get(p.label));
  for (const p of state.boxes.problems) item(`not read (${p.kind}): ${p.message}${p.text ? ` — ${p.text}` : ""}`, null, "problem");
  $("stage").dataset.boxes = String(state.boxes.boxes.length);
}

// One filled box per merged token, coloured by its share of the maximum (the heatmap canvas holds nothing else, so
// its pixels are the attention alone).
function drawHeat(canvas) {
  const ctx = canvas.getContext("2d"), values = currentVisionGrid(), g = state.session.grid;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.style.opacity = String($("opacity").value / 100);
  if (!values || !g) return;
  let max = 0;
  for (const v of values) max = Math.max(max, v);
  const s = state.scale;
  g.boxes.forEach(([x0, y0, x1, y1], m) => {
    const [r, gg, b] = ramp(max > 0 ? values[m] / max : 0);
    ctx.fillStyle = `rgb(${r},${gg},${b})`;
    // whole canvas pixels, so neighbouring boxes neither overlap nor leave seams
    const px0 = Math.round(x0 * s), py0 = Math.round(y0 * s);
    ctx.fillRect(px0, py0, Math.round(x1 * s) - px0, Math.round(y1 * s) - py0);
  });
  let total = 0;
  for (const v of values) total += v;
  $("legend").textContent = `colour: attention / max (max ${max.toPrecision(3)}; the photo's tokens hold ${(100 * total).toFixed(1)}% of this selection's attention)`;
}

function drawGrid(canvas) {
  const ctx = canvas.getContext("2d"), g = state.session.grid, s = state.scale;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!g) return;
  ctx.strokeStyle = "rgba(255,255,255,0.55)";
  ctx.lineWidth = 1;
  for (const [x0, y0, x1, y1] of g.boxes) ctx.strokeRect(x0 * s + 0.5, y0 * s + 0.5, (x1 - x0) * s - 1, (y1 - y0) * s - 1);
}

function cellAt(evt) {
  const g = state.session && state.session.grid;
  if (!g) return -1;
  const rect = $("grid").getBoundingClientRect();
  const x = (evt.clientX - rect.left) / state.scale, y = (evt.clientY - rect.top) / state.scale;
  return g.boxes.findIndex(([x0, y0, x1, y1]) => x >= x0 && x < x1 && y >= y0 && y < y1);
}

$("stage").addEventListener("mousemove", (evt) => {
  const tip = $("tooltip"), m = cellAt(evt);
  if (m < 0) { tip.hidden = true; return; }
  const g = state.session.grid, [t, h, w] = g.positions[m], [, r, c] = g.thw[m];
  const values = currentVisionGrid();
  tip.innerHTML = `cell (row ${r}, col ${c}) · input column ${g.columns[m]}<br>M-RoPE (t, h, w) = (${t}, ${h}, ${w})` +
    (values ? `<br>attention ${values[m].toPrecision(3)}` : "");
  const rect = $("stage").getBoundingClientRect();
  tip.style.left = `${evt.clientX - rect.left + 12}px`;
  tip.style.top = `${evt.clientY - rect.top + 12}px`;
  tip.hidden = false;
});
$("stage").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });

function renderText() {
  const ins = state.inspection, box = $("text-attention");
  box.innerHTML = "";
  const w = selectLN(ins.text.attention, $("layer-select").value, $("head-select").value);
  let max = 0;
  for (const v of w) max = Math.max(max, v);
  let prev = -1;
  ins.text.columns.forEach((col, i) => {
    if (col > prev + 1 && ins.vision) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = `[photo: ${col - prev - 1} tokens]`;
      box.appendChild(chip);
    }
    prev = col;
    const span = document.createElement("span");
    span.textContent = visible(ins.text.tokens[i]);
    const a = max > 0 ? w[i] / max : 0;
    span.style.background = `rgba(234, 88, 12, ${(0.85 * a).toFixed(3)})`;
    if (a > 0.6) span.style.color = "#fff";
    if (col >= ins.text.prompt_tokens) span.className = "generated";
    span.title = `column ${col} · attention ${w[i].toPrecision(3)}`;
    box.appendChild(span);
  });
}

function renderLens() {
  const ins = state.inspection, table = $("logit-lens");
  const head = "<tr><th>after</th>" + [1, 2, 3, 4, 5].map((i) => `<th>#${i}</th>`).join("") + "</tr>";
  const esc = (s) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  table.innerHTML = head + ins.logit_lens.map((row) => `<tr><th>${row.layer}</th>` + row.top.map((t) =>
    `<td class="${t.id === ins.id ? "hit" : ""}">${esc(visible(t.text))} <span class="p">${t.p >= 0.001 ? t.p.toFixed(3) : t.p.toExponential(1)}</span></td>`
  ).join("") + "</tr>").join("");
}

for (const id of ["layer-select", "head-select"]) {
  $(id).addEventListener("change", () => { if (state.inspection) { drawAll(); renderText(); } });
}
$("show-grid").addEventListener("change", drawAll);
$("show-boxes").addEventListener("change", drawAll);
$("opacity").addEventListener("input", () => { $("heatmap").style.opacity = String($("opacity").value / 100); });
$("run").addEventListener("click", run);

fetch("/explorer/api/info").then((r) => r.json()).then((info) => {
  $("model-info").textContent = `${info.model} · ${info.layers} layers × ${info.heads} heads`;
}).catch(() => { $("model-info").textContent = ""; });
