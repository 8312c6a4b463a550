// fetalscan page: log in with the token, upload a study, show the results, save the reader's review.
// Plain JavaScript, no dependencies, no build step. Text from the server is always set as text
// (textContent), never as HTML.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "fetalscan-token";
const READER_KEY = "fetalscan-reader";
const state = { auth: true, token: sessionStorage.getItem(TOKEN_KEY) || "", classes: [], files: [],
                study: null, disclaimer: "", urls: [] };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function headers(extra = {}) {
  return state.auth && state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(path, options = {}) {
  const res = await fetch(API + path, { ...options, headers: headers(options.headers || {}) });
  if (res.status === 401 && state.auth) {
    logout("The token was not accepted; log in again.");
    throw new Error("not logged in");
  }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try { const body = await res.json(); if (body.detail) msg = body.detail; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

function pct(p) { return `${(100 * p).toFixed(1)} %`; }
function size(bytes) {
  return bytes < 1048576 ? `${Math.max(1, Math.round(bytes / 1024))} KiB` : `${(bytes / 1048576).toFixed(1)} MiB`;
}

// ------------------------------------------------------------------ start, log in, log out
async function start() {
  let health;
  try {
    health = await (await fetch(`${API}/health`)).json();
  } catch (e) {
    $("model-badge").textContent = "service not reachable";
    return;
  }
  state.auth = health.auth === "token";
  state.classes = health.classes || [];
  state.disclaimer = health.disclaimer || $("top-disclaimer").textContent;
  $("top-disclaimer").textContent = state.disclaimer;
  $("version").textContent = health.version || "";
  $("model-badge").textContent = `model: ${health.model} · ${state.classes.length} classes` +
    (health.biometry ? " · biometry" : "");
  $("auth-badge").textContent = state.auth ? "token required" : "authentication OFF";
  $("auth-badge").classList.toggle("off", !state.auth);
  $("insecure-banner").hidden = state.auth;
  if (!state.auth || state.token) await checkToken();
  else showLogin();
}

function showLogin(message = "") {
  $("login").hidden = false;
  $("upload").hidden = true;
  $("result").hidden = true;
  $("logout").hidden = true;
  $("login-error").textContent = message;
  $("token").focus();
}

async function checkToken() {
  try {
    const info = await (await api("/model")).json();
    state.classes = info.model.classes;
    $("login").hidden = true;
    $("upload").hidden = false;
    $("logout").hidden = !state.auth;
    fillClasses();
    loadModelCard();
  } catch (e) {
    if (state.auth) showLogin(e.message === "not logged in" ? "The token was not accepted." : e.message);
  }
}

async function loadModelCard() {
  try {
    const body = await (await api("/model/card")).json();
    $("model-card").textContent = body.markdown;
    $("model-card-section").hidden = false;
  } catch (e) {
    $("model-card-section").hidden = true;
  }
}

function logout(message = "") {
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token").value = "";
  await checkToken();
});
$("logout").addEventListener("click", () => logout(""));

// ------------------------------------------------------------------ choosing files
const drop = $("drop");
drop.addEventListener("click", () => $("files").click());
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("files").click(); });
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  addFiles(ev.dataTransfer.files);
});
$("files").addEventListener("change", (ev) => { addFiles(ev.target.files); ev.target.value = ""; });
$("clear").addEventListener("click", () => { state.files = []; renderFiles(); });

function addFiles(list) {
  for (const f of list) state.files.push(f);
  renderFiles();
}

function renderFiles() {
  const ul = $("file-list");
  ul.replaceChildren(...state.files.map((f) => el("li", { text: `${f.name} (${size(f.size)})` })));
  $("analyze").disabled = state.files.length === 0;
  $("analyze-error").textContent = "";
}

// ------------------------------------------------------------------ analysing
$("analyze-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!state.files.length) return;
  const form = new FormData();
  for (const f of state.files) form.append("files", f, f.name);
  const ps = $("pixel-size").value.trim();
  if (ps) form.append("pixel_size_mm", ps);
  $("analyze").disabled = true;
  $("analyze-error").textContent = "";
  $("analyze-status").textContent = `Analysing ${state.files.length} file(s)…`;
  try {
    const result = await (await api("/analyze", { method: "POST", body: form })).json();
    $("analyze-status").textContent = "";
    await showResult(result);
  } catch (e) {
    $("analyze-status").textContent = "";
    $("analyze-error").textContent = e.message;
  } finally {
    $("analyze").disabled = state.files.length === 0;
  }
});

function probBars(probs, top) {
  const box = el("div", { class: "bars" });
  const entries = Object.entries(probs).sort((a, b) => b[1] - a[1]);
  for (const [cls, p] of entries) {
    const fill = el("span");
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    box.append(el("span", { text: cls }), el("div", { class: cls === top ? "bar top" : "bar" }, fill),
               el("span", { class: "num", text: pct(p) }));
  }
  return box;
}

async function authedImage(url) {
  const blob = await (await api(url.replace(API, ""))).blob();
  const obj = URL.createObjectURL(blob);
  state.urls.push(obj);
  return obj;
}

function releaseImages() {
  for (const u of state.urls) URL.revokeObjectURL(u);
  state.urls = [];
}

async function showResult(result) {
  releaseImages();
  state.study = result.study;
  const s = result.study;
  const summary = $("study-summary");
  const notes = el("ul", { class: "notes" }, ...(s.notes || []).map((n) => el("li", { text: n })));
  summary.replaceChildren(
    el("div", { class: "finding", text: `Model's finding: ${s.prediction}` }),
    probBars(s.probabilities, s.prediction),
    el("p", { class: "muted", text: `${s.n_images} image(s) from ${s.n_files} file(s); study rule: ${s.rule} of the ` +
      `image probabilities · model ${result.model.name} (${result.model.sha256.slice(0, 12)}) · study ${s.id}` }),
    notes);
  for (const p of document.querySelectorAll("[data-disclaimer]")) p.textContent = result.disclaimer;
  $("review-history").replaceChildren();
  $("review-error").textContent = "";
  $("review-status").textContent = "";
  $("reader").value = localStorage.getItem(READER_KEY) || "";
  $("comment").value = "";
  fillClasses();
  $("result").hidden = false;
  const grid = $("images");
  grid.replaceChildren();
  for (const im of result.images) grid.append(imageCard(im, result.disclaimer));
  applyHeatmapControls();
  await loadImages(result.images);
  $("result").scrollIntoView({ behavior: "smooth" });
}

function imageCard(im, disclaimer) {
  const title = im.frame == null ? im.name : `${im.name} · frame ${im.frame}`;
  const base = el("img", { alt: `image ${title}`, "data-src": im.image_url });
  const layer = el("img", { class: "layer", alt: "", "data-src": `${im.heatmap_url}?layer=true` });
  const onPlane = im.brain_plane !== false;
  const plane = el("p", { class: onPlane ? "plane" : "plane off",
    text: `Plane (SonoNet-16): ${im.plane} (${pct(im.plane_confidence)})` +
          (onPlane ? "" : " — not a brain plane: read this result with care") });
  const card = el("div", { class: "card image-card" },
    el("h3", { text: title }),
    el("div", { class: "viewer" }, base, layer),
    plane,
    el("p", {}, el("strong", { text: `Image: ${im.prediction}` })),
    probBars(im.probabilities, im.prediction));
  if (im.biometry) card.append(biometryBlock(im.biometry));
  card.append(el("p", { class: "muted" },
    el("a", { href: "#", "data-report": `images/${im.index}/sc.dcm`, text: "DICOM SC (image with heatmap)" })));
  card.append(el("p", { class: "disclaimer", text: disclaimer }));
  return card;
}

function biometryBlock(b) {
  const box = el("div", { class: "biometry" }, el("strong", { text: "Head biometry" }));
  const u = b.unit;
  if (b.status === "ok") {
    const f = (v) => (v == null ? "–" : `${v.toFixed(1)} ${u}`);
    box.append(el("p", { text: `HC ${f(b.hc)} · BPD ${f(b.bpd)} · OFD ${f(b.ofd)}` }));
    box.append(el("p", { text: u === "mm" ? `GA (Hadlock 1984): ${b.ga_text}` :
      "Pixel size unknown: lengths in pixels, no GA (enter the pixel size before analysing)." }));
  } else {
    box.append(el("p", { text: b.summary }));
  }
  if (b.warnings && b.warnings.length) box.append(el("ul", {}, ...b.warnings.map((w) => el("li", { text: w }))));
  box.append(el("img", { alt: "head ellipse and measurements", "data-src": b.overlay_url }));
  box.append(el("p", { class: "muted", text: b.disclaimer }));
  return box;
}

async function loadImages() {
  for (const img of document.querySelectorAll("#images img[data-src]")) {
    try { img.src = await authedImage(img.getAttribute("data-src")); } catch (e) { img.alt = `(${e.message})`; }
  }
}

function applyHeatmapControls() {
  const on = $("heat-toggle").checked;
  const opacity = Number($("heat-opacity").value) / 100;
  for (const layer of document.querySelectorAll("#images img.layer")) {
    layer.hidden = !on;
    layer.style.opacity = String(opacity);
  }
  $("heat-opacity").disabled = !on;
}
$("heat-toggle").addEventListener("change", applyHeatmapControls);
$("heat-opacity").addEventListener("input", applyHeatmapControls);

// ------------------------------------------------------------------ reviewing
function fillClasses() {
  const sel = $("final-class");
  const current = state.study ? state.study.prediction : null;
  sel.replaceChildren(...state.classes.map((c) => el("option", { value: c, text: c })));
  const other = state.classes.find((c) => c !== current);
  if (other) sel.value = other;
}

for (const radio of document.querySelectorAll("input[name=decision]")) {
  radio.addEventListener("change", () => { $("final-class").disabled = decision() !== "override"; });
}
function decision() { return document.querySelector("input[name=decision]:checked").value; }

$("review-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!state.study) return;
  const body = { reader: $("reader").value.trim(), decision: decision(), comment: $("comment").value };
  if (body.decision === "override") body.final_class = $("final-class").value;
  $("review-error").textContent = "";
  try {
    await api(`/studies/${state.study.id}/review`, { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" } });
    localStorage.setItem(READER_KEY, body.reader);
    $("review-status").textContent = "Saved.";
    await showHistory();
  } catch (e) {
    $("review-error").textContent = e.message;
  }
});

async function showHistory() {
  const reviews = await (await api(`/studies/${state.study.id}/reviews`)).json();
  const items = reviews.map((r, i) => el("li", { class: i === reviews.length - 1 ? "current" : "",
    text: `${r.created_utc} · ${r.reader} · ${r.decision === "confirm" ? "confirmed" : "overrode to"} ` +
          `${r.final_class}${r.comment ? ` · “${r.comment}”` : ""}${i === reviews.length - 1 ? " (in force)" : ""}` }));
  $("review-history").replaceChildren(...items);
}

$("csv-link").addEventListener("click", async (ev) => {
  ev.preventDefault();
  try {
    const blob = await (await api("/reviews.csv")).blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: "reviews.csv" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (e) {
    $("review-error").textContent = e.message;
  }
});

// Reports of the shown study (PDF, DICOM SR, DICOM SC per image): fetched with the token, then saved.
document.addEventListener("click", async (ev) => {
  const link = ev.target.closest && ev.target.closest("a[data-report]");
  if (!link || !state.study) return;
  ev.preventDefault();
  const path = link.getAttribute("data-report");
  const name = `${state.study.id}_${path.replaceAll("/", "_")}`.replace("_report.pdf", ".pdf");
  try {
    const blob = await (await api(`/studies/${state.study.id}/${path}`)).blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (e) {
    $("review-error").textContent = e.message;
  }
});

start();
