// digitlens serve: the page. Plain JavaScript, no library and no request outside this app.
// Draw on #pad (pointer events: mouse, pen, touch); the canvas goes to POST /api/predict as a PNG,
// debounced while drawing; every model's probabilities and maps are drawn from the JSON answer.
"use strict";

const PAD_SIZE = 280;
const STROKE_WIDTH = 20;      // px on the 280 px pad: after the 20x20 fit, about MNIST's 2-3 px strokes
const DEBOUNCE_MS = 120;
const METHOD_LABELS = {
  saliency: "saliency", integrated_gradients: "integrated gradients", gradcam: "Grad-CAM",
  attention: "attention (last layer)", attention_rollout: "attention rollout",
  input_x_gradient: "input x gradient", occlusion: "occlusion", hirescam: "HiResCAM",
};

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const state = {
  runs: [], strokes: [], current: null, base: null,   // base: a 28x28 image loaded into the pad
  timer: null, sentAt: 0, inFlight: false, again: false, seq: 0, shown: 0,
  cell: null, methods: [],
};

function $(id) { return document.getElementById(id); }
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
function say(text) { $("message").textContent = text || ""; }
function pct(p) { return (100 * p).toFixed(p >= 0.9995 || p < 0.0005 ? 0 : 1) + "%"; }

// ---------------------------------------------------------------- drawing pad

function redraw() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, PAD_SIZE, PAD_SIZE);
  if (state.base) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.base, 0, 0, PAD_SIZE, PAD_SIZE);
  }
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const stroke of state.strokes) drawStroke(stroke);
}

function drawStroke(stroke) {
  ctx.lineWidth = stroke.width;
  const pts = stroke.points;
  if (pts.length === 1) {
    ctx.beginPath();
    ctx.arc(pts[0][0], pts[0][1], stroke.width / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(pts[0][0], pts[0][1]);
  for (let i = 1; i < pts.length; i++) ctx.lineTo(pts[i][0], pts[i][1]);
  ctx.stroke();
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * PAD_SIZE / box.width, (event.clientY - box.top) * PAD_SIZE / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  // a pen's pressure widens the stroke a little; a mouse reports 0.5
  const width = STROKE_WIDTH * (event.pointerType === "pen" ? 0.7 + 0.6 * event.pressure : 1);
  state.current = { points: [padPoint(event)], width };
  state.strokes.push(state.current);
  redraw();
});
pad.addEventListener("pointermove", (event) => {
  if (!state.current) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) state.current.points.push(padPoint(e));
  redraw();
  schedulePredict();
});

// Live while drawing: at most one request per DEBOUNCE_MS (and one in flight), plus one when the
// pen rests, so the bars follow the stroke without a request per pointer event.
function schedulePredict() {
  clearTimeout(state.timer);
  const wait = DEBOUNCE_MS - (performance.now() - state.sentAt);
  if (wait <= 0) predictNow();
  else state.timer = setTimeout(predictNow, wait);
}
function endStroke() {
  if (!state.current) return;
  state.current = null;
  predictNow();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function padIsEmpty() { return state.strokes.length === 0 && !state.base; }

$("clear").addEventListener("click", () => {
  state.strokes = [];
  state.base = null;
  redraw();
  showEmpty();
});
$("undo").addEventListener("click", () => {
  if (state.strokes.length) state.strokes.pop();
  else state.base = null;
  redraw();
  if (padIsEmpty()) showEmpty(); else predictNow();
});

function loadIntoPad(pixels) {
  // pixels: 28x28 in [0, 1], light ink on dark (MNIST form)
  const small = document.createElement("canvas");
  small.width = pixels[0].length;
  small.height = pixels.length;
  const sctx = small.getContext("2d");
  const data = sctx.createImageData(small.width, small.height);
  pixels.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (y * small.width + x), g = Math.round(255 * Math.max(0, Math.min(1, v)));
    data.data[i] = data.data[i + 1] = data.data[i + 2] = g;
    data.data[i + 3] = 255;
  }));
  sctx.putImageData(data, 0, 0);
  state.base = small;
  state.strokes = [];
  redraw();
}

$("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  const answer = await postPredict(file, file.type || "application/octet-stream");
  if (answer) {
    loadIntoPad(answer.input);   // the 28x28 the models saw: edit it and watch the prediction change
    showAnswer(answer);
  }
});

// ---------------------------------------------------------------- predictions

function chosenMethods() {
  return Array.from(document.querySelectorAll("#methods input:checked")).map((box) => box.value);
}

async function predictNow() {
  clearTimeout(state.timer);
  if (padIsEmpty()) { showEmpty(); return; }
  if (state.inFlight) { state.again = true; return; }   // one request at a time; the latest drawing wins
  state.inFlight = true;
  state.sentAt = performance.now();
  const seq = ++state.seq;
  try {
    const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const answer = await postPredict(blob, "image/png");
    if (answer && seq > state.shown && !padIsEmpty()) { state.shown = seq; showAnswer(answer); }
  } finally {
    state.inFlight = false;
    if (state.again) { state.again = false; predictNow(); }
  }
}

async function postPredict(body, contentType) {
  const methods = chosenMethods().join(",");
  const started = performance.now();
  try {
    const response = await fetch(`/api/predict?steps=1&methods=${encodeURIComponent(methods)}`,
                                 { method: "POST", headers: { "Content-Type": contentType }, body });
    const answer = await response.json();
    if (!response.ok) { say(answer.error || `error ${response.status}`); return null; }
    say("");
    $("status").textContent = `${Math.round(performance.now() - started)} ms round trip (server ${Math.round(answer.elapsed_ms)} ms)`;
    return answer;
  } catch (err) {
    say(`the server did not answer (${err.message})`);
    return null;
  }
}

function showEmpty() {
  state.shown = ++state.seq;   // an answer still on its way is stale now
  $("models").replaceChildren(el("p", { class: "note", text: "Draw a digit: every model's prediction and maps appear here as you draw." }));
  $("steps").replaceChildren();
  say("");
}

function showAnswer(answer) {
  $("steps").replaceChildren(...(answer.steps || []).map((step) =>
    el("figure", {}, el("img", { src: step.png, alt: step.title }), el("figcaption", { text: step.title }))));
  const cards = answer.models.map((result) => modelCard(result, answer.input));
  $("models").replaceChildren(...cards);
}

function modelCard(result, input) {
  const best = result.prediction;
  const bars = el("div", { class: "bars" });
  result.probabilities.forEach((p, digit) => {
    const bar = el("div", { class: digit === best ? "bar top" : "bar" }, el("span"));
    bar.firstChild.style.width = `${(100 * p).toFixed(2)}%`;
    bars.append(el("span", { text: String(digit) }), bar, el("span", { class: "pct", text: pct(p) }));
  });
  const maps = el("div", { class: "maps" });
  maps.append(mapFigure(input, null, "input the model saw"));
  for (const [method, values] of Object.entries(result.maps)) maps.append(mapFigure(input, values, METHOD_LABELS[method] || method));
  const card = el("article", { class: "model-card", "data-model": result.id },
    el("h3", {}, el("span", { class: "prediction", text: String(best) }),
       el("span", { text: `${result.id}: ${pct(result.probabilities[best])}` })),
    bars, maps);
  for (const [method, reason] of Object.entries(result.skipped || {})) {
    card.append(el("p", { class: "skipped", text: `${METHOD_LABELS[method] || method}: ${reason}` }));
  }
  return card;
}

// ---------------------------------------------------------------- heatmaps

// Colour maps written out (a few lines; no plotting library runs in the browser): non-negative
// maps in a black-red-yellow "hot" ramp, signed maps blue (negative) to red (positive).
function hot(t) { return [Math.min(1, 3 * t), Math.max(0, Math.min(1, 3 * t - 1)), Math.max(0, 3 * t - 2)]; }
function diverging(t) { // t in [-1, 1]
  return t >= 0 ? [1, 1 - 0.85 * t, 1 - 0.85 * t] : [1 + 0.85 * t, 1 + 0.85 * t, 1];
}

function drawMap(canvas, input, values) {
  // The input in grey with the map over it: alpha grows with |value| / max |value|.
  const size = input.length;
  canvas.width = canvas.height = size;
  const c = canvas.getContext("2d");
  const image = c.createImageData(size, size);
  let peak = 0, signed = false;
  if (values) for (const row of values) for (const v of row) { peak = Math.max(peak, Math.abs(v)); if (v < 0) signed = true; }
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const i = 4 * (y * size + x);
      const grey = input[y][x];
      let rgb = [grey, grey, grey];
      if (values && peak > 0) {
        const t = values[y][x] / peak;
        const alpha = Math.min(1, Math.abs(t) * 1.3) * 0.85;
        const colour = signed ? diverging(t) : hot(t);
        rgb = rgb.map((g, k) => 0.45 * g * (1 - alpha) + colour[k] * alpha);
      }
      image.data[i] = 255 * rgb[0]; image.data[i + 1] = 255 * rgb[1]; image.data[i + 2] = 255 * rgb[2];
      image.data[i + 3] = 255;
    }
  }
  c.putImageData(image, 0, 0);
  return { peak, signed };
}

function mapFigure(input, values, title) {
  const canvas = el("canvas", { class: values ? "heatmap" : "model-input", title });
  const { peak, signed } = drawMap(canvas, input, values);
  const figure = el("figure", {}, canvas);
  if (values) {
    const bar = el("div", { class: "colorbar" });
    const stops = signed ? [-1, -0.5, 0, 0.5, 1].map((t) => diverging(t)) : [0, 0.25, 0.5, 0.75, 1].map((t) => hot(t));
    bar.style.background = `linear-gradient(to right, ${stops.map((c) => `rgb(${c.map((v) => Math.round(255 * v)).join(",")})`).join(",")})`;
    const low = signed ? `-${peak.toPrecision(2)}` : "0";
    figure.append(bar, el("div", { class: "colorbar-labels" }, el("span", { text: low }), el("span", { text: peak.toPrecision(2) })));
  }
  figure.append(el("figcaption", { text: title }));
  return figure;
}

// ---------------------------------------------------------------- browse the mistakes

async function getJSON(url) {
  try {
    const response = await fetch(url);
    const answer = await response.json();
    if (!response.ok) { say(answer.error || `error ${response.status}`); return null; }
    return answer;
  } catch (err) {
    say(`the server did not answer (${err.message})`);
    return null;
  }
}

function currentRun() { return state.runs.find((run) => run.id === $("run-select").value); }

function drawConfusion() {
  const run = currentRun();
  const table = $("confusion");
  table.replaceChildren();
  if (!run) return;
  const matrix = run.confusion;
  const offPeak = Math.max(1, ...matrix.flatMap((row, t) => row.filter((_, p) => p !== t)));
  const diagPeak = Math.max(1, ...matrix.map((row, t) => row[t]));
  table.append(el("tr", {}, el("th", { text: "true \\ pred" }), ...matrix[0].map((_, p) => el("th", { text: String(p) }))));
  matrix.forEach((row, t) => {
    const tr = el("tr", {}, el("th", { text: String(t) }));
    row.forEach((count, p) => {
      const button = el("button", { type: "button", "data-true": t, "data-pred": p, text: String(count),
                                    title: `true ${t}, predicted ${p}: ${count} images` });
      const share = t === p ? count / diagPeak : Math.sqrt(count / offPeak);
      button.style.background = count === 0 ? "#fafbfc" : t === p ? `rgba(42,111,219,${0.15 + 0.6 * share})` : `rgba(192,57,43,${0.15 + 0.7 * share})`;
      button.style.color = share > 0.6 ? "#fff" : "#1d2430";
      if (state.cell && state.cell[0] === t && state.cell[1] === p) button.classList.add("selected");
      button.addEventListener("click", () => { state.cell = [t, p]; drawConfusion(); loadCell(); });
      tr.append(el("td", {}, button));
    });
    table.append(tr);
  });
  $("browse-note").textContent = `${run.id}: ${run.n_test} test images, accuracy ${pct(run.accuracy)}.`;
}

function overlayMethods() {
  const run = currentRun();
  const select = $("overlay-method");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", text: "none" }));
  if (!run) return;
  for (const method of run.methods.filter((m) => METHOD_LABELS[m])) {
    select.append(el("option", { value: method, text: METHOD_LABELS[method] }));
  }
  select.value = run.methods.includes(keep) ? keep : (run.methods.includes("saliency") ? "saliency" : "");
}

function confidenceRange() {
  const low = Math.max(0, Math.min(1, parseFloat($("min-conf").value) || 0));
  const high = Math.max(0, Math.min(1, parseFloat($("max-conf").value)));
  return [low, Number.isNaN(high) ? 1 : high];
}

async function loadCell() {
  const run = currentRun();
  if (!run || !state.cell) return;
  const [t, p] = state.cell;
  const [low, high] = confidenceRange();
  const method = $("overlay-method").value;
  const url = `/api/runs/${encodeURIComponent(run.id)}/cell?true=${t}&pred=${p}&min_confidence=${low}&max_confidence=${high}` +
              `&limit=60${method ? `&method=${method}` : ""}`;
  const answer = await getJSON(url);
  if (!answer) return;
  $("gallery-title").textContent = `${run.id}: true ${t}, predicted ${p}: ${answer.total} images` +
    (answer.total > answer.items.length ? ` (the ${answer.items.length} most confident)` : "") +
    (method ? `, ${METHOD_LABELS[method]} towards the prediction` : "");
  $("gallery").replaceChildren(...answer.items.map((item) =>
    thumb(item, item.map, `#${item.index} ${item.true}\u2192${item.pred} ${pct(item.confidence)}`)));
}

async function loadDisagreements() {
  const [a, b] = state.runs.filter((run) => run.browsable);
  const digit = $("digit-filter").value;
  const answer = await getJSON(`/api/disagreements?a=${encodeURIComponent(a.id)}&b=${encodeURIComponent(b.id)}&limit=60` +
                               (digit ? `&digit=${digit}` : ""));
  if (!answer) return;
  state.cell = null;
  drawConfusion();
  $("gallery-title").textContent = `${answer.total} test images${digit ? ` of ${digit}s` : ""} where ${answer.a} and ${answer.b} disagree` +
    (answer.total > answer.items.length ? ` (the ${answer.items.length} where one is surest)` : "");
  $("gallery").replaceChildren(...answer.items.map((item) =>
    thumb(item, null, `#${item.index} true ${item.true}: ${answer.a} ${item.pred_a} (${pct(item.confidence_a)}), ${answer.b} ${item.pred_b} (${pct(item.confidence_b)})`)));
}

function thumb(item, values, caption) {
  const canvas = el("canvas");
  drawMap(canvas, item.pixels, values || null);
  const button = el("button", { type: "button", class: "thumb", title: "open in the drawing pad" }, canvas, el("div", { text: caption }));
  button.addEventListener("click", () => {
    loadIntoPad(item.pixels);
    window.scrollTo({ top: 0, behavior: "smooth" });
    predictNow();
  });
  return button;
}

// ---------------------------------------------------------------- start

async function start() {
  redraw();
  const answer = await getJSON("/api/runs");
  if (!answer) return;
  state.runs = answer.runs;
  $("models-line").textContent = `models: ${answer.runs.map((run) => `${run.id} (${run.architecture || run.kind})`).join(", ")}`;
  const offered = answer.page_methods.filter((m) => answer.runs.some((run) => run.methods.includes(m)));
  const defaults = new Set(answer.runs.flatMap((run) => run.defaults));
  $("methods").append(...offered.map((method) => {
    const box = el("input", { type: "checkbox", value: method });
    box.checked = defaults.has(method);
    box.addEventListener("change", predictNow);
    return el("label", {}, box, ` ${METHOD_LABELS[method]}`);
  }));
  const browsable = answer.runs.filter((run) => run.browsable);
  $("run-select").replaceChildren(...browsable.map((run) => el("option", { value: run.id, text: run.id })));
  if (!browsable.length) {
    $("browse-note").textContent = answer.runs.map((run) => run.browse_note).filter(Boolean).join("; ") || "no run with saved test predictions";
  }
  $("disagree").hidden = browsable.length < 2;
  $("digit-filter").parentElement.hidden = browsable.length < 2;
  overlayMethods();
  drawConfusion();
}

$("run-select").addEventListener("change", () => { overlayMethods(); drawConfusion(); loadCell(); });
for (const id of ["min-conf", "max-conf", "overlay-method"]) $(id).addEventListener("change", loadCell);
$("disagree").addEventListener("click", loadDisagreements);
$("digit-filter").addEventListener("change", () => { if (!state.cell && !$("disagree").hidden) loadDisagreements(); });

start();
