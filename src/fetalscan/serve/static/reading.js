// fetalscan reading app: one blinded reading at a time; the server measures the time and keeps every answer.
"use strict";
(function () {
  const API = "/api/v1/reading";
  let token = sessionStorage.getItem("fetalscan-reading-token");
  let current = null;
  const objectUrls = [];

  const $ = (id) => document.getElementById(id);
  const show = (id, on) => { $(id).hidden = !on; };

  async function call(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token) headers["Authorization"] = "Bearer " + token;
    const res = await fetch(API + path, Object.assign({}, options, { headers }));
    if (res.status === 401 && path !== "/login") { logout(); throw new Error("please log in again"); }
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return res;
  }

  async function image(url) {  // images need the reader's token: fetch them and show blob: URLs
    const res = await fetch(url, { headers: { "Authorization": "Bearer " + token } });
    if (!res.ok) throw new Error("image not available");
    const src = URL.createObjectURL(await res.blob());
    objectUrls.push(src);
    const img = document.createElement("img");
    img.src = src;
    img.alt = "case image";
    return img;
  }

  function clearImages() {
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    $("images").replaceChildren();
    $("ai-heatmaps").replaceChildren();
    $("ai-probs").replaceChildren();
  }

  function logout() {
    token = null;
    sessionStorage.removeItem("fetalscan-reading-token");
    show("reading", false); show("status", false); show("login", true);
  }

  async function next() {
    clearImages();
    const data = await (await call("/next")).json();
    current = data;
    show("login", false);
    if (data.status !== "reading") {
      show("reading", false); show("status", true);
      $("status-text").textContent = data.status === "done"
        ? "All readings are done. Thank you."
        : "Session " + data.session + " opens on " + data.opens_utc + " (washout). Your progress is saved.";
      return;
    }
    show("status", false); show("reading", true);
    $("progress").textContent = "Reader " + data.reader + " · reading " + (data.n_done + 1) + " of " + data.n_total
      + " · session " + data.session;
    $("arm").textContent = data.step === "first" ? "Read this case without AI; the AI output follows your answer."
      : data.step === "final" ? "Your first answer is kept. Now with the AI output: give your final answer."
      : data.ai ? "Read this case with the AI output." : "Read this case without AI.";
    const select = $("answer");
    select.replaceChildren();
    for (const c of data.classes) {
      const o = document.createElement("option"); o.value = c; o.textContent = c.replace(/_/g, " "); select.append(o);
    }
    $("confidence").value = 50; $("confidence-value").textContent = "50";
    show("first-answer", !!data.first_answer);
    if (data.first_answer) {
      $("first-answer").textContent = "Your first answer: " + data.first_answer.answer.replace(/_/g, " ")
        + " (confidence " + data.first_answer.confidence + ")";
      select.value = data.first_answer.answer;
    }
    for (const url of data.images) $("images").append(await image(url));
    show("ai", data.ai);
    if (data.ai) {
      const ai = await (await call("/items/" + data.position + "/ai")).json();
      $("ai-finding").textContent = "AI finding: " + ai.prediction.replace(/_/g, " ");
      for (const [c, p] of Object.entries(ai.probabilities)) {
        const li = document.createElement("li"); li.textContent = c.replace(/_/g, " ") + ": " + (100 * p).toFixed(0) + "%";
        $("ai-probs").append(li);
      }
      for (const url of ai.heatmaps) $("ai-heatmaps").append(await image(url));
      $("ai-note").textContent = ai.disclaimer;
    }
  }

  $("confidence").addEventListener("input", () => { $("confidence-value").textContent = $("confidence").value; });

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    show("login-error", false);
    try {
      const res = await call("/login", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code: $("code").value.trim() }) });
      token = (await res.json()).token;
      sessionStorage.setItem("fetalscan-reading-token", token);
      await next();
    } catch (e) { $("login-error").textContent = e.message; show("login-error", true); }
  });

  $("answer-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    show("answer-error", false);
    $("submit").disabled = true;
    try {
      await call("/answer", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ position: current.position, step: current.step, answer: $("answer").value,
                               confidence: Number($("confidence").value) }) });
      await next();
    } catch (e) { $("answer-error").textContent = e.message; show("answer-error", true); }
    finally { $("submit").disabled = false; }
  });

  if (token) next().catch(() => logout());
})();
