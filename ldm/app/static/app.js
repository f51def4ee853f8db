// The page of scripts/app.py: upload, paint a mask or draw boxes, live plan label, refine with progress, compare.
// Plain browser JavaScript, no libraries, nothing loaded from another origin (the server's CSP forbids it anyway).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, // /api/info
  upload: null, // {id, name, width, height, image_url, ...}
  image: null, // HTMLImageElement of the upload as the server decoded it
  mask: null, // canvas at the image's size: white strokes on transparent = refine
  tint: null, // scratch canvas for the red overlay
  painted: false,
  stroke: null, // last point of the brush stroke in progress
  boxDraft: null, // [start, end] of the box being drawn
  planOk: false,
  busy: false,
  following: null, // id of the request whose progress is shown (the Cancel button's target)
};

// ------------------------------------------------------------------------------------------------------------ http
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message}); is scripts/app.py still running?`);
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

const postJSON = (path, data) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function setMsg(el, text, bad = false) {
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

// -------------------------------------------------------------------------------------------------------- settings
function number(id) {
  const value = Number($(id).value);
  return $(id).value !== "" && Number.isFinite(value) ? value : $(id).value; // the server names a bad field
}

function settings() {
  return {
    start_t: number("start"), sampler: $("sampler").value, step_mode: $("step-mode").value, steps: number("steps"),
    seed: number("seed"), n_samples: number("n-samples"), mode: $("mode").value, boxes: $("boxes").value,
    mask_blur: number("mask-blur"), mask_dilate: number("mask-dilate"), region_padding: number("region-padding"),
    ...(state.info && state.info.text_conditioned ? {
      prompt: $("prompt").value, negative_prompt: $("negative-prompt").value, guidance_scale: number("guidance-scale"),
    } : {}),
  };
}

function applySettings(s) {
  const ids = { start_t: "start", sampler: "sampler", step_mode: "step-mode", steps: "steps", seed: "seed",
    n_samples: "n-samples", mode: "mode", mask_blur: "mask-blur", mask_dilate: "mask-dilate",
    region_padding: "region-padding", prompt: "prompt", negative_prompt: "negative-prompt",
    guidance_scale: "guidance-scale" };
  for (const [key, id] of Object.entries(ids)) if (key in s) $(id).value = s[key];
  if (Array.isArray(s.boxes)) $("boxes").value = s.boxes.join("\n");
  showStart();
}

// The page counts in timesteps t (lower = gentler), the project's convention; the same start counted in steps from
// noise (k = T - t) and as img2img strength (t / T) is only in the tooltip and under "more".
function otherSchemes(t) {
  const total = state.info ? state.info.num_timesteps : 1000;
  return `start t=${t} is step ${total - t} of ${total} counted from pure noise, or strength ${(t / total).toFixed(2)}`;
}

function showStart() {
  const t = Number($("start").value);
  $("start-out").textContent = `${t}`;
  $("start-other").textContent = `${otherSchemes(t)}.`;
  $("start-label").title = `timestep t: lower changes less. ${otherSchemes(t)}`;
}

let planTimer = null;
let planSeq = 0;
function schedulePlan() {
  showStart();
  clearTimeout(planTimer);
  planTimer = setTimeout(updatePlan, 120);
}

// The label under the start_t slider: which expert windows the steps cross, from the server's plan.
async function updatePlan() {
  const seq = ++planSeq;
  const label = $("plan-label");
  try {
    const plan = await postJSON("/api/plan", settings());
    if (seq !== planSeq) return;
    state.planOk = plan.ok;
    label.replaceChildren();
    label.classList.toggle("bad", !plan.ok);
    if (plan.ok) {
      const windows = document.createElement("b");
      windows.textContent = plan.t_windows;
      const rest = ` — ${plan.n_steps} step${plan.n_steps === 1 ? "" : "s"} from t=${plan.effective_start_t} ` +
        `down to t=1. Routing: ${plan.routing_t}`;
      label.append(windows, document.createTextNode(rest));
      label.title = `counted in steps from noise: ${plan.windows}; ${plan.routing}`;
    } else {
      label.textContent = plan.error;
      label.title = "";
    }
  } catch (err) {
    if (seq !== planSeq) return;
    state.planOk = false;
    setMsg(label, err.message, true);
  }
  updateButton();
}

function updateButton() {
  $("refine").disabled = state.busy || !state.upload || !state.planOk;
}

// ---------------------------------------------------------------------------------------------------------- upload
async function uploadFile(file) {
  const msg = $("upload-msg");
  setMsg(msg, `uploading ${file.name}…`);
  try {
    const up = await api(`/api/upload?name=${encodeURIComponent(file.name)}`,
      { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
    await showUpload(up);
    const alpha = up.has_alpha ? ", transparency kept" : "";
    setMsg(msg, `${up.name}: ${up.width}×${up.height} ${up.format || ""}${alpha}`);
  } catch (err) {
    clearImage();
    $("file").value = ""; // the same file can be chosen again once fixed
    setMsg(msg, err.message, true);
  }
  updateButton();
}

// Forget the shown image, its mask and strokes, and blank the canvas (after a failed upload: nothing of the previous
// image may stay on the page as if it were the one being refined).
function clearImage() {
  Object.assign(state, { upload: null, image: null, mask: null, tint: null, painted: false, stroke: null, boxDraft: null });
  const view = $("view");
  view.width = 512; // also clears its pixels
  view.height = 320;
  view.style.width = "";
  view.style.height = "";
  view.classList.remove("pixelated");
  $("canvas-wrap").classList.add("empty");
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not show ${url}`));
    img.src = url;
  });
}

async function showUpload(up) {
  const img = await loadImage(up.image_url);
  state.upload = up;
  state.image = img;
  const view = $("view");
  view.width = img.naturalWidth;
  view.height = img.naturalHeight;
  state.mask = document.createElement("canvas");
  state.mask.width = img.naturalWidth;
  state.mask.height = img.naturalHeight;
  state.tint = document.createElement("canvas");
  state.tint.width = img.naturalWidth;
  state.tint.height = img.naturalHeight;
  state.painted = false;
  $("canvas-wrap").classList.remove("empty");
  const size = Math.max(4, Math.round(Math.max(img.naturalWidth, img.naturalHeight) / 20));
  $("brush-size").max = `${Math.max(200, Math.round(Math.max(img.naturalWidth, img.naturalHeight) / 2))}`;
  $("brush-size").value = `${size}`;
  $("brush-size-out").textContent = `${size} px`;
  fitView();
  redraw();
}

// Show the canvas as large as the panel allows (small images are enlarged: easier to paint), aspect kept.
function fitView() {
  if (!state.image) return;
  const view = $("view");
  const width = $("canvas-wrap").clientWidth - 2;
  const scale = Math.min(width / view.width, (0.65 * window.innerHeight) / view.height);
  view.style.width = `${Math.floor(view.width * scale)}px`;
  view.style.height = `${Math.floor(view.height * scale)}px`;
  view.classList.toggle("pixelated", scale >= 2);
}

// A comparison as wide as the results panel (at most COMPARE_SIDE px), small images enlarged with sharp pixels.
const COMPARE_SIDE = 640;
function fitCompare(before) {
  const w = before.naturalWidth, h = before.naturalHeight;
  const side = Math.min(COMPARE_SIDE, $("results").clientWidth);
  const scale = Math.min(side / w, (0.5 * window.innerHeight) / h);
  before.style.width = `${Math.floor(w * scale)}px`;
  before.style.height = `${Math.floor(h * scale)}px`;
  before.parentElement.classList.toggle("pixelated", scale >= 2);
}

// A saved black/white mask PNG back into the stroke layer (white -> opaque white, black -> transparent).
async function showMask(url) {
  const img = await loadImage(url);
  const m = state.mask.getContext("2d");
  m.clearRect(0, 0, state.mask.width, state.mask.height);
  m.drawImage(img, 0, 0);
  const data = m.getImageData(0, 0, state.mask.width, state.mask.height);
  for (let i = 0; i < data.data.length; i += 4) {
    data.data[i + 3] = data.data[i];
    data.data[i] = data.data[i + 1] = data.data[i + 2] = 255;
  }
  m.putImageData(data, 0, 0);
  state.painted = true;
  redraw();
}

// ----------------------------------------------------------------------------------------------------- mask editor
const BOX_LINE = /^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*(?:@\s*(\d+)\s*)?$/;

function redraw() {
  if (!state.image) return;
  const view = $("view");
  const ctx = view.getContext("2d");
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(state.image, 0, 0);
  if (state.painted) {
    const t = state.tint.getContext("2d");
    t.globalCompositeOperation = "source-over";
    t.clearRect(0, 0, view.width, view.height);
    t.drawImage(state.mask, 0, 0);
    t.globalCompositeOperation = "source-in";
    t.fillStyle = "rgba(255, 40, 40, 0.5)";
    t.fillRect(0, 0, view.width, view.height);
    ctx.drawImage(state.tint, 0, 0);
  }
  ctx.lineWidth = Math.max(1, Math.round(Math.max(view.width, view.height) / 300));
  ctx.strokeStyle = "#ffd400";
  ctx.setLineDash([]);
  for (const line of $("boxes").value.split(/[;\n]/)) {
    const m = BOX_LINE.exec(line);
    if (m) ctx.strokeRect(+m[1], +m[2], m[3] - m[1], m[4] - m[2]);
  }
  if (state.boxDraft) {
    const [a, b] = state.boxDraft;
    ctx.setLineDash([6, 4]);
    ctx.strokeRect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
  }
}

let frameQueued = false;
function redrawSoon() {
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(() => {
    frameQueued = false;
    redraw();
  });
}

function tool() {
  return document.querySelector('input[name="tool"]:checked').value;
}

function imagePoint(ev) {
  const view = $("view");
  const r = view.getBoundingClientRect();
  const x = ((ev.clientX - r.left) * view.width) / r.width;
  const y = ((ev.clientY - r.top) * view.height) / r.height;
  return [Math.min(Math.max(x, 0), view.width), Math.min(Math.max(y, 0), view.height)];
}

function paint(a, b) {
  const m = state.mask.getContext("2d");
  m.globalCompositeOperation = tool() === "eraser" ? "destination-out" : "source-over";
  m.strokeStyle = "#fff";
  m.lineWidth = Number($("brush-size").value);
  m.lineCap = "round";
  m.lineJoin = "round";
  m.beginPath();
  m.moveTo(a[0], a[1]);
  m.lineTo(b[0], b[1]);
  m.stroke();
  if (tool() !== "eraser") state.painted = true;
  redrawSoon();
}

function onPointerDown(ev) {
  if (!state.image) return;
  ev.preventDefault();
  $("view").setPointerCapture(ev.pointerId);
  const p = imagePoint(ev);
  if (tool() === "box") {
    state.boxDraft = [p, p];
  } else {
    state.stroke = p;
    paint(p, p);
  }
}

function onPointerMove(ev) {
  if (state.boxDraft) {
    state.boxDraft[1] = imagePoint(ev);
    redrawSoon();
  } else if (state.stroke) {
    const p = imagePoint(ev);
    paint(state.stroke, p);
    state.stroke = p;
  }
}

function onPointerUp(ev) {
  if (state.boxDraft) {
    const a = state.boxDraft[0];
    const b = ev.type === "pointerup" ? imagePoint(ev) : state.boxDraft[1];
    const x0 = Math.round(Math.min(a[0], b[0])), y0 = Math.round(Math.min(a[1], b[1]));
    const x1 = Math.round(Math.max(a[0], b[0])), y1 = Math.round(Math.max(a[1], b[1]));
    state.boxDraft = null;
    if (x1 - x0 >= 2 && y1 - y0 >= 2) {
      const text = $("boxes").value.trim();
      $("boxes").value = (text ? `${text}\n` : "") + `${x0},${y0},${x1},${y1}`;
      schedulePlan();
    }
    redrawSoon();
  }
  state.stroke = null;
}

// The painted mask as the server reads masks: a PNG of the image's size, white = refine, black = keep.
function maskDataURL() {
  return new Promise((resolve) => {
    if (!state.painted) return resolve(null);
    const c = document.createElement("canvas");
    c.width = state.mask.width;
    c.height = state.mask.height;
    const x = c.getContext("2d");
    x.fillStyle = "#000";
    x.fillRect(0, 0, c.width, c.height);
    x.drawImage(state.mask, 0, 0);
    c.toBlob((blob) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.readAsDataURL(blob);
    }, "image/png");
  });
}

// ---------------------------------------------------------------------------------------------------------- refine
async function startRefine() {
  const status = $("status");
  state.busy = true;
  updateButton();
  setMsg(status, "sending…");
  try {
    const s = settings();
    const mask = s.mode === "whole" ? null : await maskDataURL();
    const job = await postJSON("/api/refine", { upload: state.upload.id, settings: s, mask });
    history.replaceState(null, "", `?job=${encodeURIComponent(job.id)}`);
    await follow(job.id);
  } catch (err) {
    setMsg(status, err.message, true);
  }
  state.busy = false;
  updateButton();
}

// Cancel the request being followed: a waiting one never runs, a running one stops after its current step.
async function cancelJob() {
  const jobId = state.following;
  if (!jobId) return;
  $("cancel").disabled = true;
  try {
    await api(`/api/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
    setMsg($("status"), "cancelling: stopping after the current step…");
  } catch (err) {
    setMsg($("status"), err.message, true);
  }
}

// Poll a request until it is done: the progress bar counts sampling steps.
async function follow(jobId) {
  try {
    state.following = jobId;
    $("cancel").hidden = false;
    $("cancel").disabled = false;
    return await poll(jobId);
  } finally {
    state.following = null;
    $("cancel").hidden = true;
  }
}

async function poll(jobId) {
  const status = $("status");
  const progress = $("progress");
  progress.hidden = false;
  let failures = 0;
  for (;;) {
    let s;
    try {
      s = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
      failures = 0;
    } catch (err) {
      if (++failures >= 20) throw err;
      await sleep(500);
      continue;
    }
    progress.value = s.total_steps ? s.done_steps / s.total_steps : 0;
    if (s.state === "queued") {
      setMsg(status, `waiting: ${s.ahead} request${s.ahead === 1 ? "" : "s"} ahead`);
    } else if (s.state === "running") {
      const stopping = s.cancelling ? " (cancelling after this step)" : "";
      setMsg(status, `refining: step ${s.done_steps} of ${s.total_steps}${stopping}`);
    } else if (s.state === "done") {
      progress.value = 1;
      setMsg(status, `done in ${s.result.seconds.toFixed(1)} s`);
      showResults(s);
      return s;
    } else if (s.state === "cancelled") {
      setMsg(status, s.message);
      return s;
    } else {
      setMsg(status, s.message, true);
      return s;
    }
    await sleep(250);
  }
}

function showResults(s) {
  const r = s.result;
  $("summary").textContent = `${s.name}: start t=${r.start_t}, first step t=${r.effective_start_t}, ` +
    `${r.n_steps} steps per sample, ${r.t_windows}; ${r.seconds.toFixed(1)} s`;
  const total = state.info ? state.info.num_timesteps : 1000;
  $("summary").title = `${otherSchemes(r.start_t)}; the first step, t=${r.effective_start_t}, is step ` +
    `${total - r.effective_start_t}; ${r.windows}`;
  $("routing").textContent = `routing: ${r.routing_t} · saved in ${r.outdir}`;
  $("routing").title = r.routing;
  const results = $("results");
  results.replaceChildren();
  for (const sample of r.samples) {
    const figure = element("figure", "sample");
    const compare = makeCompare(r.before_url, sample.url, `after, seed ${sample.seed}`, fitCompare);
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = sample.download_url;
    link.download = sample.name;
    link.textContent = `download ${sample.name}`;
    caption.append(document.createTextNode(`seed ${sample.seed} · `), link);
    figure.append(compare, caption);
    results.append(figure);
  }
  document.body.dataset.results = `${r.samples.length}`;
}

// A request named in the address (?job=<id>, set after each refine): its image, mask, settings and results again.
async function restore(jobId) {
  try {
    const s = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
    if (s.settings) applySettings(s.settings);
    if (s.upload) {
      await showUpload(s.upload);
      setMsg($("upload-msg"), `${s.upload.name}: ${s.upload.width}×${s.upload.height}`);
      if (s.mask_url) await showMask(s.mask_url);
    }
    schedulePlan();
    await follow(jobId);
  } catch (err) {
    setMsg($("status"), err.message, true);
  }
}

// ------------------------------------------------------------------------------------------------------------ init
async function init() {
  try {
    state.info = await api("/api/info");
    const info = state.info;
    const experts = info.windows.map((w) => `${w.name} (${w.text})`).join("; ");
    $("experts").textContent = `${info.windows.length} expert(s) on ${info.device}: ${experts} · results ` +
      `are written to ${info.outdir}`;
    $("experts").title = info.describe;
    // The slider runs over the starts the loaded experts can run (the union of their windows, from t=1 up), before
    // the defaults are applied: a value above the old max would be clamped.
    const start = $("start");
    start.min = `${info.start.min}`;
    start.max = `${info.start.max}`;
    $("start-range").textContent = `(the experts' range: ${info.start.min}–${info.start.max})`;
    $("prompt-row").hidden = !info.text_conditioned; // only experts that read a prompt get one
    applySettings(info.defaults);
  } catch (err) {
    setMsg($("experts"), err.message, true);
  }
  $("file").addEventListener("change", () => {
    if ($("file").files.length) uploadFile($("file").files[0]);
  });
  const view = $("view");
  view.addEventListener("pointerdown", onPointerDown);
  view.addEventListener("pointermove", onPointerMove);
  view.addEventListener("pointerup", onPointerUp);
  view.addEventListener("pointercancel", onPointerUp);
  $("brush-size").addEventListener("input", () => {
    $("brush-size-out").textContent = `${$("brush-size").value} px`;
  });
  $("clear-mask").addEventListener("click", () => {
    if (!state.mask) return;
    state.mask.getContext("2d").clearRect(0, 0, state.mask.width, state.mask.height);
    state.painted = false;
    redraw();
  });
  $("boxes").addEventListener("input", () => {
    redrawSoon();
    schedulePlan();
  });
  for (const id of ["start", "sampler", "steps", "step-mode", "mode"]) {
    $(id).addEventListener("input", schedulePlan);
  }
  $("refine").addEventListener("click", startRefine);
  $("cancel").addEventListener("click", cancelJob);
  window.addEventListener("resize", fitView);
  const job = new URLSearchParams(location.search).get("job");
  if (job) {
    await restore(job);
  } else {
    await updatePlan();
  }
  document.body.dataset.ready = "1";
}

init();
