// rnncap serve: the page. Each photo is sent as its own request to /api/caption
// (two at a time, retried after Retry-After when the server is busy), so one bad
// file shows its own error and the others still get their captions. Everything
// user-supplied is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const IN_FLIGHT = 2;      // requests this page keeps open at once
const MAX_RETRIES = 8;    // 503 answers tolerated per photo
let defaults = {};
const queue = [];
let running = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function describe(m) {
  const kind = m.model === "attention" ? "attention" : m.model === "transformer" ? "Transformer"
    : m.cell ? m.cell.toUpperCase() : "model";
  const parts = [`${kind} captioner`];
  if (m.vocab_size) parts.push(`${m.vocab_size} words`);
  if (m.encoder && m.encoder.name) {
    const size = m.encoder.image_size ? ` at ${m.encoder.image_size} px` : "";
    parts.push(`encoder ${m.encoder.name}${size}`);
  }
  if (m.training_data) parts.push(`trained on ${m.training_data}`);
  return parts.join(", ");
}

// An ensemble: how it averages, then one line per member.
function describeEnsemble(m) {
  const how = m.ensemble === "prob" ? "mean of probabilities" : "mean of log-probabilities";
  const lines = m.members.map((x) => `  ${x.checkpoint}: ${describe(x)}`);
  return `ensemble of ${m.members.length} captioners (${how}):\n` + lines.join("\n");
}

async function loadModel() {
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    defaults = m.decoding_defaults || {};
    $("model").textContent = m.members ? describeEnsemble(m) : `${m.checkpoint}: ` + describe(m);
    if (m.warning) {  // e.g. the demo's model, which knows only the synthetic scenes
      $("warning").textContent = m.warning.charAt(0).toUpperCase() + m.warning.slice(1);
      $("warning").hidden = false;
    }
    if (defaults.beam) $("beam").placeholder = `default ${defaults.beam}`;
  } catch (e) {
    $("model").textContent = "Could not read the model description from the server.";
  }
}

function query() {
  const p = new URLSearchParams();
  const beam = parseInt($("beam").value, 10);
  const width = beam || defaults.beam || 1;
  if (beam) p.set("beam", String(beam));
  const n = parseInt($("n").value, 10);
  if (n) p.set("n", String(Math.min(n, width)));
  const q = p.toString();
  return q ? "?" + q : "";
}

function addPhotos(files) {
  for (const file of files) {
    const card = el("article", "card");
    card.append(el("h2", null, file.name || "photo"));
    const frame = el("div", "frame");
    const img = el("img");
    img.alt = file.name || "photo";
    img.src = URL.createObjectURL(file);
    img.onerror = () => { img.remove(); };  // not something the browser can show
    const canvas = el("canvas");
    frame.append(img, canvas);
    card.append(frame, el("p", "pending", "Captioning…"));
    $("results").prepend(card);
    queue.push({ file, card, canvas, img });
  }
  pump();
}

function pump() {
  while (running < IN_FLIGHT && queue.length) {
    const job = queue.shift();
    running++;
    caption(job).finally(() => { running--; pump(); });
  }
  $("status").textContent = queue.length ? `${queue.length} photo(s) waiting` : "";
}

const sleep = (s) => new Promise((ok) => setTimeout(ok, s * 1000));

async function caption(job, attempt = 0) {
  const body = new FormData();
  body.append("image", job.file, job.file.name || "photo");
  let r, data;
  try {
    r = await fetch("/api/caption" + query(), { method: "POST", body });
  } catch (e) {
    return showError(job, "Could not reach the server; is `rnncap serve` still running?");
  }
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 503 && attempt < MAX_RETRIES) {
    const wait = parseFloat(r.headers.get("Retry-After")) || 1;
    job.card.querySelector(".pending").textContent = `The server is busy; trying again in ${wait} s…`;
    await sleep(wait);
    return caption(job, attempt + 1);
  }
  if (!r.ok) {
    return showError(job, (data && data.error) || `The server answered HTTP ${r.status}.`);
  }
  showCaptions(job, data.photos[0], data.ms);
}

function showError(job, message) {
  const p = job.card.querySelector(".pending");
  const e = el("p", "error", message);
  e.setAttribute("role", "alert");
  p.replaceWith(e);
}

function showCaptions(job, photo, ms) {
  const list = el("ol", "captions");
  for (const c of photo.captions) {
    const li = el("li");
    const text = el("span", "text");
    const words = c.words || c.caption.split(" ");
    words.forEach((w, i) => {
      if (i) text.append(" ");
      const span = el("span", "word", w);
      if (c.attention && c.attention[i]) {
        span.addEventListener("mouseenter", () => drawAttention(job, c.attention[i]));
        span.addEventListener("mouseleave", () => clearAttention(job));
      }
      text.append(span);
    });
    if (c.attention) li.classList.add("attend");
    const p = Math.exp(c.logprob);
    const prob = p >= 0.001 ? `${(100 * p).toPrecision(2)}%` : p.toExponential(1);
    li.append(text, el("span", "prob", `p = ${prob} (log p ${c.logprob.toFixed(2)})`));
    li.title = `log-probability ${c.logprob.toFixed(3)}`;
    list.append(li);
  }
  const timing = el("p", "muted",
    `${photo.width}×${photo.height} px; decoded in ${photo.ms.decode} ms, captioned in ${photo.ms.caption} ms`);
  job.card.querySelector(".pending").replaceWith(list, timing);
}

// An attention grid (h rows of w weights) drawn over the photo: the places the
// word looked at stay bright, the rest is shaded. The grid is painted at its own
// size and stretched with smoothing, so the map reads as a soft blob.
function drawAttention(job, grid) {
  const h = grid.length, w = grid[0].length;
  let max = 0;
  for (const row of grid) for (const v of row) max = Math.max(max, v);
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const sctx = small.getContext("2d");
  const px = sctx.createImageData(w, h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const a = max > 0 ? grid[y][x] / max : 0;
    const k = 4 * (y * w + x);
    px.data[k] = px.data[k + 1] = px.data[k + 2] = 0;
    px.data[k + 3] = Math.round(200 * (1 - a));
  }
  sctx.putImageData(px, 0, 0);
  const c = job.canvas;
  c.width = job.img.naturalWidth || w;
  c.height = job.img.naturalHeight || h;
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.drawImage(small, 0, 0, c.width, c.height);
}

function clearAttention(job) {
  const c = job.canvas;
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

const drop = $("drop");
$("file").addEventListener("change", (e) => { addPhotos(e.target.files); e.target.value = ""; });
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => addPhotos(e.dataTransfer.files));
// A photo dropped beside the target should not navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());
$("options").addEventListener("submit", (e) => e.preventDefault());
loadModel();
