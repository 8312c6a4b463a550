// fetalscan page, Live section: play a chosen video, send its frames to /api/v1/stream over a
// WebSocket at the video's rate, and show the rolling prediction. Plain JavaScript, no
// dependencies; server text is set as text only. The token (kept by app.js in the tab's
// session storage) travels as the WebSocket subprotocol "bearer.<token>", never in the URL.
"use strict";

(() => {
  const STREAM = "/api/v1/stream";
  const PROTOCOL = "fetalscan.stream.v1";
  const TOKEN_PREFIX = "bearer.";
  const TOKEN_KEY = "fetalscan-token";
  const MAGIC = [0x46, 0x53, 0x46, 0x31]; // "FSF1": a JSON header before the JPEG bytes
  const ROLLING = 10; // answers averaged in the rolling prediction
  const MAX_BUFFERED = 2 * 1024 * 1024; // bytes waiting in the socket: above it a frame is skipped here

  const $ = (id) => document.getElementById(id);
  const live = { ws: null, running: false, sent: 0, skipped: 0, results: [], latencies: [], sentAt: new Map(),
                 url: null, auth: true, classes: [], firstAnswer: 0, analysed: 0, dropped: 0, heatUrl: null };

  function text(id, value) { const n = $(id); if (n) n.textContent = value; }
  function pct(p) { return `${(100 * p).toFixed(1)} %`; }

  function median(values) {
    if (!values.length) return NaN;
    const s = [...values].sort((a, b) => a - b);
    return s[Math.floor((s.length - 1) / 2)];
  }
  function quantile(values, q) {
    if (!values.length) return NaN;
    const s = [...values].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.floor(q * (s.length - 1) + 0.5))];
  }

  function renderBars(probs) {
    const box = $("live-bars");
    box.replaceChildren();
    const top = Object.keys(probs).reduce((a, b) => (probs[a] >= probs[b] ? a : b));
    for (const [c, p] of Object.entries(probs)) {
      const bar = document.createElement("div");
      bar.className = c === top ? "bar top" : "bar";
      const fill = document.createElement("span");
      fill.style.width = `${(100 * p).toFixed(1)}%`;
      bar.append(fill);
      const name = document.createElement("span");
      name.textContent = c;
      const num = document.createElement("span");
      num.className = "num";
      num.textContent = pct(p);
      box.append(name, bar, num);
    }
    return top;
  }

  function onResult(msg) {
    live.results.push(msg.probabilities);
    if (live.results.length > ROLLING) live.results.shift();
    const rolling = {};
    for (const c of Object.keys(msg.probabilities)) {
      rolling[c] = live.results.reduce((s, r) => s + (r[c] || 0), 0) / live.results.length;
    }
    const top = renderBars(rolling);
    text("live-finding", top);
    const sent = live.sentAt.get(msg.frame);
    if (sent !== undefined) {
      live.latencies.push(performance.now() - sent);
      if (live.latencies.length > 300) live.latencies.shift();
      for (const k of live.sentAt.keys()) { if (k <= msg.frame) live.sentAt.delete(k); }
    }
    if (!live.firstAnswer) live.firstAnswer = performance.now();
    live.analysed += 1;
    live.dropped = msg.dropped_total;
    const seconds = (performance.now() - live.firstAnswer) / 1000;
    const fps = seconds > 0.5 ? (live.analysed - 1) / seconds : NaN;
    let line = `frame ${msg.frame}: ${msg.prediction} · analysed ${live.analysed} of ${live.sent} sent`
      + ` · ${Number.isFinite(fps) ? fps.toFixed(1) : "–"} frames/s`
      + ` · latency p50 ${median(live.latencies).toFixed(0)} ms, p95 ${quantile(live.latencies, 0.95).toFixed(0)} ms`
      + ` · dropped ${msg.dropped_total} (server) + ${live.skipped} (here)`;
    if (msg.plane) line += ` · plane ${msg.plane} (${pct(msg.plane_confidence)})`;
    text("live-stats", line);
  }

  function onMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "ready") {
      live.classes = msg.classes || [];
      if (msg.disclaimer) text("live-disclaimer", msg.disclaimer);
      text("live-status", `connected · model ${msg.model} · ${msg.backend === "onnx" ? "ONNX Runtime" : "PyTorch"}`);
      if ($("live-plane").checked) live.ws.send(JSON.stringify({ type: "options", plane: true }));
      play();
    } else if (msg.type === "result") {
      onResult(msg);
    } else if (msg.type === "heatmap") {
      if (live.heatUrl) URL.revokeObjectURL(live.heatUrl);
      const bytes = Uint8Array.from(atob(msg.png_base64), (ch) => ch.charCodeAt(0));
      live.heatUrl = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
      const img = $("live-heatmap");
      img.src = live.heatUrl;
      img.hidden = false;
      text("live-heat-note", `frame ${msg.frame}, evidence for “${msg.target}”. ${msg.disclaimer}`);
    } else if (msg.type === "error") {
      text("live-error", msg.detail);
    }
  }

  async function sendFrame() {
    const video = $("live-video");
    if (!live.running || !live.ws || live.ws.readyState !== WebSocket.OPEN || video.videoWidth === 0) return;
    if (live.ws.bufferedAmount > MAX_BUFFERED) { live.skipped += 1; return; }
    const canvas = $("live-canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    if (!blob || !live.ws || live.ws.readyState !== WebSocket.OPEN) return;
    const id = live.sent;
    live.sent += 1;
    const header = new TextEncoder().encode(JSON.stringify({ id, t: video.currentTime }));
    const jpeg = new Uint8Array(await blob.arrayBuffer());
    const out = new Uint8Array(8 + header.length + jpeg.length);
    out.set(MAGIC, 0);
    new DataView(out.buffer).setUint32(4, header.length, false);
    out.set(header, 8);
    out.set(jpeg, 8 + header.length);
    live.sentAt.set(id, performance.now());
    live.ws.send(out);
  }

  function grabLoop() {
    const video = $("live-video");
    if (!live.running) return;
    if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
      // one callback per frame the video presents: frames are sent at the video's own rate
      const step = () => { if (!live.running) return; sendFrame(); video.requestVideoFrameCallback(step); };
      video.requestVideoFrameCallback(step);
    } else {
      live.timer = setInterval(sendFrame, 1000 / 30);
    }
  }

  function play() {
    const video = $("live-video");
    live.running = true;
    video.play().then(grabLoop).catch((e) => text("live-error", `the video does not play here: ${e.message}`));
  }

  function stop(reason = "") {
    live.running = false;
    if (live.timer) { clearInterval(live.timer); live.timer = null; }
    $("live-video").pause();
    if (live.ws) { live.ws.onclose = null; live.ws.close(1000); live.ws = null; }
    $("live-start").disabled = !$("live-file").files.length;
    $("live-stop").disabled = true;
    $("live-heat").disabled = true;
    if (reason) text("live-status", reason);
  }

  function start() {
    text("live-error", "");
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    if (live.auth && !token) { text("live-error", "Log in first (the token above)."); return; }
    Object.assign(live, { sent: 0, skipped: 0, results: [], latencies: [], firstAnswer: 0, analysed: 0 });
    live.sentAt.clear();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const protocols = live.auth ? [PROTOCOL, TOKEN_PREFIX + token] : [PROTOCOL];
    const ws = new WebSocket(`${scheme}//${location.host}${STREAM}`, protocols);
    live.ws = ws;
    ws.onmessage = onMessage;
    ws.onclose = (event) => stop(event.code === 1008 ? "The token was not accepted; log in again."
                                                     : `disconnected (${event.code})`);
    ws.onerror = () => text("live-error", "the live connection failed");
    $("live-start").disabled = true;
    $("live-stop").disabled = false;
    $("live-heat").disabled = false;
    text("live-status", "connecting…");
  }

  async function init() {
    if (!$("live")) return;
    try {
      const health = await (await fetch("/api/v1/health")).json();
      live.auth = health.auth === "token";
      if (health.disclaimer) text("live-disclaimer", health.disclaimer);
    } catch (e) { /* app.js says the service is not reachable */ }
    $("live-file").addEventListener("change", () => {
      stop();
      const file = $("live-file").files[0];
      if (live.url) URL.revokeObjectURL(live.url);
      live.url = file ? URL.createObjectURL(file) : null;
      const video = $("live-video");
      if (live.url) { video.src = live.url; video.hidden = false; }
      $("live-start").disabled = !file;
    });
    $("live-video").addEventListener("ended", () => stop("the video ended"));
    $("live-start").addEventListener("click", start);
    $("live-stop").addEventListener("click", () => stop("stopped"));
    $("live-heat").addEventListener("click", () => {
      if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({ type: "heatmap" }));
    });
    $("live-plane").addEventListener("change", () => {
      if (live.ws && live.ws.readyState === WebSocket.OPEN) {
        live.ws.send(JSON.stringify({ type: "options", plane: $("live-plane").checked }));
      }
    });
  }

  document.addEventListener("DOMContentLoaded", init);
})();
