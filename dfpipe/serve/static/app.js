// The page's logic: send the chosen image to /predict (fast score), then /explain (heatmap).
"use strict";
const $ = (id) => document.getElementById(id);
const VERDICT_CLASS = { "likely real": "real", "uncertain": "unsure", "likely fake": "fake" };
let thresholds = null;

async function postImage(url, file) {
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  const res = await fetch(url, { method: "POST", body: form });
  const body = await res.json().catch(() => ({ detail: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.detail || `HTTP ${res.status}`);
  return body;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

// A model trained on the synthetic demo data says so above everything else (the API's "warning").
function showWarning(text) {
  $("demo-banner").textContent = text || "";
  $("demo-banner").hidden = !text;
}

function showScore(r) {
  if (r.warning) showWarning(r.warning);
  const s = Number(r.result);
  $("score").textContent = s.toFixed(4);
  $("score").dataset.score = String(s);
  $("verdict").textContent = r.verdict;
  $("verdict").className = "verdict " + (VERDICT_CLASS[r.verdict] || "");
  $("bar").style.width = `${(100 * Math.min(1, Math.max(0, s))).toFixed(1)}%`;
}

function placeTicks() {
  if (!thresholds) return;
  $("t-real").style.left = `${100 * thresholds.t_real}%`;
  $("t-fake").style.left = `${100 * thresholds.t_fake}%`;
}

async function analyse(file) {
  showError("");
  if (!file) return;
  $("result").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("heatmap").removeAttribute("src");
  $("heat-region").textContent = "";
  $("heat-wait").hidden = false;
  $("heat-wait").textContent = "computing heatmap…";
  $("score").textContent = "…";
  $("score").dataset.score = "";
  $("verdict").textContent = "";
  document.body.dataset.state = "scoring";
  try {
    showScore(await postImage("/predict", file));
    document.body.dataset.state = "scored";
    const ex = await postImage("/explain", file);
    $("heatmap").src = ex.heatmap;
    $("heat-wait").hidden = true;
    $("heat-region").textContent = ex.heatmap_region === "face crop" ? " of the face crop the experts score" : "";
    $("heat-caption").title = `${ex.method}; largest score change ${ex.heatmap_scale.toFixed(4)}`;
    document.body.dataset.state = "explained";
  } catch (err) {
    $("result").hidden = $("score").dataset.score === "";
    $("heat-wait").textContent = "no heatmap";
    showError(err.message);
    document.body.dataset.state = "error";
  }
}

// How an upload is prepared (from the experts' checkpoints): face crop, max side, each input policy.
function preprocessText(h) {
  const s1 = h.stage1;
  const parts = [s1.face_crop === "none" ? "no face crop" : `face crop ${s1.face_crop} ×${s1.face_margin}`];
  if (s1.max_side > 0) parts.push(`max side ${s1.max_side}px`);
  const inputs = [...new Set(Object.values(h.inputs).map((p) => `${p.mode} ${p.size}px`))];
  return [...parts, ...inputs].join(" · ");
}

async function loadHealth() {
  try {
    const h = await (await fetch("/health")).json();
    thresholds = h.thresholds;
    $("model").textContent = h.identity.header;  // "2 models · trained on ... · commit ..."
    $("model-tech").textContent = `model ${h.model} · ${h.combine} · ${h.tta.length} TTA view(s) · ${h.device}` +
      ` · ${preprocessText(h)}`;
    showWarning(h.identity.warning);
    placeTicks();
  } catch (err) {
    $("model").textContent = "model unavailable";
  }
}

const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL") $("file").click(); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", (e) => analyse(e.target.files[0]));
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
loadHealth();
