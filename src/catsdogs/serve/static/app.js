// catsdogs web page: pick or drop a photo, POST it to /predict, show the label, probabilities and
// (unless unticked) the heatmap of what drove the answer.
"use strict";

const $ = (id) => document.getElementById(id);
const input = $("file-input");
const dropzone = $("dropzone");
const preview = $("preview");
let previewUrl = null;

// The API key (when the server has one): asked once, kept in this tab's session storage.
const KEY_NAME = "catsdogs-api-key";
const keyForm = $("key-form");

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: "Bearer " + key } : {};
}

// fetch with the key; a 401 forgets a refused key and shows the key form.
async function apiFetch(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    const refused = sessionStorage.getItem(KEY_NAME) !== null;
    sessionStorage.removeItem(KEY_NAME);
    $("key-error").hidden = !refused;
    keyForm.hidden = false;
    $("key-input").focus();
  }
  return response;
}

keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_NAME, $("key-input").value.trim());
  $("key-input").value = "";
  keyForm.hidden = true;
  loadModel();
});

// With a key the report cannot be a plain link (a link sends no Authorization header): fetch it
// with the key and save it as a file.
async function downloadReport(e) {
  if (!sessionStorage.getItem(KEY_NAME)) return;  // no key: the plain link works
  e.preventDefault();
  const response = await apiFetch("/report");
  if (!response.ok) return;
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = "report.html";
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function pct(p) {
  return (100 * p).toFixed(1) + "%";
}

function showError(code, detail) {
  $("answer").hidden = true;
  showExplanation(null);
  const box = $("error");
  box.hidden = false;
  box.innerHTML = "";
  const strong = document.createElement("code");
  strong.textContent = code;
  box.append(strong, document.createTextNode(": " + (detail || "")));
  $("status").textContent = "Could not classify this file.";
}

// The server answers label "unknown" when the photo looks like none of the trained classes.
const UNKNOWN = "unknown";

function neitherText(classes) {
  if (classes.length === 2) return "neither a " + classes[0] + " nor a " + classes[1];
  return "none of: " + classes.join(", ");
}

function showResult(result) {
  $("error").hidden = true;
  $("answer").hidden = false;
  $("status").textContent = "";
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  const unknown = result.label === UNKNOWN;
  $("answer").classList.toggle("is-unknown", unknown);
  $("label").textContent = unknown ? "Neither" : result.label;
  $("probability").textContent = unknown ? "" : pct(result.probability);
  $("prob-bar").style.width = unknown ? "0%" : pct(result.probability);
  // What the photo looks like (ImageNet concepts): instead of a class for "unknown", and beside the class
  // when a strong concept the classes do not own is also there; absent for scratch-trained runs.
  const concepts = result.looks_like || [];
  const looksLike = $("looks-like");
  looksLike.hidden = concepts.length === 0;
  looksLike.textContent = concepts.length
    ? (unknown ? "Looks like: " : "Also looks like: ") +
      concepts.map((c) => c.concept + " " + Math.round(100 * c.probability) + " %").join(", ")
    : "";
  const note = $("unknown-note");
  note.hidden = !unknown;
  note.textContent = unknown
    ? "This photo looks like " + neitherText(entries.map((e) => e[0]).sort()) +
      ". It is unlike the photos the model was trained on, so it does not pick a class."
    : "";
  $("bars-title").textContent = unknown ? "If it had to choose" : "All classes";
  const list = $("bars");
  list.innerHTML = "";
  for (const [name, p] of entries) {
    const li = document.createElement("li");
    if (name === (unknown ? entries[0][0] : result.label)) li.className = "best";
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = pct(p);
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = pct(p);
    li.append(label, bar, value);
    list.append(li);
  }
  showExplanation(result.explanation);
}

function showExplanation(explanation) {
  const box = $("explanation-box");
  if (!explanation) {
    box.hidden = true;
    $("explanation").removeAttribute("src");
    return;
  }
  $("explanation").src = "data:image/png;base64," + explanation.overlay_png;
  $("explanation-label").textContent = "(" + explanation.label + ")";
  box.hidden = false;
}

async function classify(file) {
  if (!file) return;
  $("file-name").textContent = file.name + " (" + Math.ceil(file.size / 1024) + " KiB)";
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  preview.src = previewUrl;
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; $("drop-hint").hidden = false; };
  $("drop-hint").hidden = true;
  $("status").textContent = "Classifying…";
  $("error").hidden = true;
  document.body.classList.add("busy");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const url = $("explain-toggle").checked ? "/predict?explain=true" : "/predict";
    const response = await apiFetch(url, { method: "POST", body: form });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok || !body || body.error) {
      showError(body && body.error ? body.error : "http_" + response.status,
                body && body.detail ? body.detail : response.statusText);
    } else {
      showResult(body);
    }
  } catch (err) {
    showError("network_error", String(err));
  } finally {
    document.body.classList.remove("busy");
  }
}

input.addEventListener("change", () => classify(input.files[0]));

for (const name of ["dragenter", "dragover"]) {
  dropzone.addEventListener(name, (e) => { e.preventDefault(); dropzone.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  dropzone.addEventListener(name, (e) => { e.preventDefault(); dropzone.classList.remove("dragging"); });
}
dropzone.addEventListener("drop", (e) => {
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) classify(file);
});
dropzone.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
});

async function loadModel() {
  try {
    const response = await apiFetch("/model");
    if (response.status === 401) {
      $("model-info").textContent = "Waiting for the API key…";
      return;
    }
    const m = await response.json();
    const parts = [
      "Model " + (m.name || "?"),
      "classes " + m.classes.join(" / "),
      m.size + "×" + m.size + " px",
      "backend " + m.backend,
    ];
    if (m.epoch != null) parts.push("epoch " + m.epoch);
    const ev = m.eval_metrics;
    if (ev && ev.accuracy != null) parts.push("test accuracy " + pct(ev.accuracy));
    else if (m.metrics && m.metrics.val_acc != null) parts.push("val accuracy " + pct(m.metrics.val_acc));
    $("model-info").textContent = parts.join(" · ");
    const link = $("report-link");
    if (m.report) {
      link.textContent = "Evaluation report";
      link.removeAttribute("aria-disabled");
      link.onclick = downloadReport;
    } else {
      link.textContent = "No report yet (run catsdogs evaluate)";
      link.removeAttribute("href");
    }
  } catch (err) {
    $("model-info").textContent = "Model info unavailable: " + err;
  }
}

loadModel();
