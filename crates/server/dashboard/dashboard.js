// The live dashboard of a minserve server (docs/dashboard.md). It reads the server-sent events
// of /dashboard/events with fetch() rather than EventSource, because only fetch can send the
// API key as an Authorization header; the key comes from the page's #key=... fragment (never
// sent to the server in a URL) or from the form shown on a 401, and stays in sessionStorage.
// Records are the engine trace's schema (docs/trace.md). No library, no build step.
"use strict";

const STEPS_KEPT = 160;       // steps drawn in the per-step charts
const SECONDS_KEPT = 60;      // seconds drawn in the throughput chart
const REQUESTS_KEPT = 120;    // finished requests drawn in the latency chart
const EVENTS_KEPT = 200;      // lines kept in the event log
const REQUESTS_TRACKED = 10000; // requests in flight followed for their latency
const RECONNECT_MS = 2000;
const IDLE_AFTER_MS = 2000;   // no new step for this long: the engine is idle

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

const view = {
  hello: null,
  steps: [],                // the latest step records
  requests: new Map(),      // request id -> { arrived, ttft } while in flight
  latencies: [],            // { ttft, e2e } of finished requests
  seconds: new Map(),       // second since the feed started -> { output, prompt }
  blockMap: null,
  totals: null,
  lastStepAt: 0,
  updates: 0,
};

// ---- the API key -------------------------------------------------------------------------

function apiKey() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) {
    sessionStorage.setItem("minserve-key", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("minserve-key");
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("minserve-key", $("key-input").value);
  $("key-form").hidden = true;
  connect();
});

function setStatus(kind, text) {
  const status = $("status");
  status.className = "status " + kind;
  status.textContent = text;
}

// ---- the events stream -------------------------------------------------------------------

async function connect() {
  const model = new URLSearchParams(location.search).get("model");
  const url = "/dashboard/events" + (model ? "?model=" + encodeURIComponent(model) : "");
  const headers = {};
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  setStatus("connecting", "connecting");
  let response;
  try {
    response = await fetch(url, { headers, cache: "no-store" });
  } catch (e) {
    setStatus("error", "cannot reach the server");
    return setTimeout(connect, RECONNECT_MS);
  }
  if (response.status === 401) {
    setStatus("error", "this server needs an API key");
    $("key-form").hidden = false;
    return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    setStatus("error", (body && body.error && body.error.message) || "HTTP " + response.status);
    return setTimeout(connect, RECONNECT_MS);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (e) {
    // The connection broke: reconnect below.
  }
  setStatus("error", "disconnected, reconnecting");
  setTimeout(connect, RECONNECT_MS);
}

function handleEvent(text) {
  let name = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length === 0) return; // a keep-alive comment
  const payload = JSON.parse(data.join("\n"));
  if (name === "hello") onHello(payload);
  else if (name === "update") onUpdate(payload);
}

function onHello(hello) {
  view.hello = hello;
  const select = $("model-select");
  select.replaceChildren(...hello.models.map((name) => {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === hello.model;
    return option;
  }));
  const pool = hello.pool;
  $("pool-shape").textContent =
    `${pool.num_blocks} blocks of ${pool.block_size} tokens` +
    (pool.kv_groups > 1 ? `, ${pool.kv_groups} KV groups` : "") +
    (pool.host_blocks > 0 ? `, ${pool.host_blocks} host blocks for swapping` : "") +
    `, up to ${hello.max_num_seqs} sequences`;
  setStatus("live", "live");
}

$("model-select").addEventListener("change", (e) => {
  location.search = "?model=" + encodeURIComponent(e.target.value);
});

function onUpdate(update) {
  for (const record of update.records) {
    if (record.type === "step") onStep(record);
    else if (record.type === "request") onRequest(record);
  }
  if (update.missed > 0) logEvent("missed", `${update.missed} records missed (the page fell behind)`);
  if (update.block_map) view.blockMap = update.block_map;
  view.totals = update.totals;
  view.updates += 1;
  document.body.dataset.updates = view.updates;
  draw();
}

function onStep(step) {
  view.steps.push(step);
  if (view.steps.length > STEPS_KEPT) view.steps.shift();
  view.lastStepAt = performance.now();
  const end = step.t_ms + step.duration_ms;
  const second = Math.floor(end / 1000);
  const bucket = view.seconds.get(second) || { output: 0, prompt: 0 };
  for (const seq of step.seqs) {
    if (seq.samples) {
      bucket.output += 1;
      const request = view.requests.get(seq.request);
      if (request && request.ttft === undefined) request.ttft = end - request.arrived;
    }
  }
  bucket.prompt += step.prefill_tokens;
  view.seconds.set(second, bucket);
  for (const old of view.seconds.keys()) {
    if (old < second - SECONDS_KEPT) view.seconds.delete(old);
  }
  if (step.preempted.length > 0) {
    const counter = $("preemption-counter");
    counter.classList.add("flash");
    setTimeout(() => counter.classList.remove("flash"), 600);
  }
}

function onRequest(r) {
  const at = (r.t_ms / 1000).toFixed(2) + " s";
  switch (r.event) {
    case "arrived":
      view.requests.set(r.request, { arrived: r.t_ms, open: r.n });
      // A request whose finish was missed (the page fell behind) is forgotten, oldest first.
      if (view.requests.size > REQUESTS_TRACKED) {
        view.requests.delete(view.requests.keys().next().value);
      }
      break;
    case "preempted":
      logEvent("preempted", `${at} step ${r.step}: request ${r.request} (seq ${r.seq}) preempted, ` +
        (r.swapped ? "K/V swapped to host" : "will recompute"));
      break;
    case "resumed":
      logEvent("resumed", `${at} step ${r.step}: request ${r.request} (seq ${r.seq}) resumed` +
        (r.swapped ? " from host" : ", recomputing"));
      break;
    case "finished": {
      const request = view.requests.get(r.request);
      logEvent("finished", `${at} step ${r.step}: request ${r.request} finished (${r.reason}` +
        (r.output_tokens !== undefined ? `, ${r.output_tokens} tokens)` : ")"));
      if (!request) break;
      request.open -= 1;
      if (request.open <= 0 || r.seq === undefined) {
        view.requests.delete(r.request);
        if (r.reason === "stop" || r.reason === "length") {
          view.latencies.push({ ttft: request.ttft, e2e: r.t_ms - request.arrived });
          if (view.latencies.length > REQUESTS_KEPT) view.latencies.shift();
        }
      }
      break;
    }
  }
}

function logEvent(kind, text) {
  const log = $("event-log");
  const line = document.createElement("li");
  line.className = kind;
  line.textContent = text;
  log.prepend(line);
  while (log.children.length > EVENTS_KEPT) log.lastChild.remove();
}

// ---- drawing -----------------------------------------------------------------------------

function draw() {
  drawCounters();
  drawBatch();
  drawQueues();
  drawBlockMap();
  drawThroughput();
  drawLatency();
  drawStepTime();
}

function drawCounters() {
  const t = view.totals;
  if (!t) return;
  const last = view.steps[view.steps.length - 1];
  const idle = performance.now() - view.lastStepAt > IDLE_AFTER_MS;
  setStatus(idle ? "idle" : "live", idle ? "live, engine idle" : "live");
  $("stat-steps").textContent = t.steps;
  $("stat-running").textContent = t.running;
  $("stat-waiting").textContent = t.waiting;
  $("stat-swapped").textContent = last ? last.swapped : 0;
  $("stat-kv").textContent = (100 * t.kv_usage).toFixed(1) + "%";
  $("stat-generated").textContent = t.generation_tokens;
  $("stat-preemptions").textContent = t.preemptions;
  $("stat-prefix").textContent = t.prefix_queried_tokens > 0
    ? (100 * t.prefix_hit_tokens / t.prefix_queried_tokens).toFixed(1) + "%" : "-";
  const seconds = [...view.seconds.keys()].sort((a, b) => a - b);
  // The last full second (the current one is still filling).
  const full = seconds.length > 1 ? view.seconds.get(seconds[seconds.length - 2]) : null;
  $("stat-rate").textContent = idle || !full ? "0" : full.output;
}

// A canvas sized to its box in device pixels, with a context in CSS pixels.
function canvasContext(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

const AXIS = 40; // room for the y labels

function compact(value) {
  return value >= 1000 ? value / 1000 + "k" : String(value);
}

function yAxis(ctx, height, max) {
  ctx.fillStyle = "#888";
  ctx.textAlign = "right";
  ctx.fillText(compact(max), AXIS - 4, 10);
  ctx.fillText("0", AXIS - 4, height - 2);
  ctx.strokeStyle = "#ddd";
  ctx.beginPath();
  ctx.moveTo(AXIS, 0);
  ctx.lineTo(AXIS, height);
  ctx.stroke();
}

function niceMax(value) {
  if (value <= 0) return 1;
  const scale = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 5, 10]) if (value <= m * scale) return m * scale;
  return 10 * scale;
}

function drawBatch() {
  const canvas = $("batch-chart");
  const { ctx, width, height } = canvasContext(canvas);
  const steps = view.steps;
  canvas.dataset.lastStep = steps.length ? steps[steps.length - 1].step : 0;
  const max = niceMax(Math.max(1, ...steps.map((s) => s.prefill_tokens + s.decode_tokens)));
  yAxis(ctx, height, max);
  const bar = (width - AXIS) / STEPS_KEPT;
  steps.forEach((s, i) => {
    const x = AXIS + i * bar;
    const decode = (s.decode_tokens / max) * height;
    const prefill = (s.prefill_tokens / max) * height;
    ctx.fillStyle = css("--decode");
    ctx.fillRect(x, height - decode, Math.max(1, bar - 1), decode);
    ctx.fillStyle = css("--prefill");
    ctx.fillRect(x, height - decode - prefill, Math.max(1, bar - 1), prefill);
    if (s.preempted.length > 0) {
      ctx.fillStyle = css("--preempt");
      ctx.fillRect(x, 0, Math.max(2, bar - 1), 6);
    }
  });
}

function drawLines(canvas, series, count) {
  const { ctx, width, height } = canvasContext(canvas);
  const max = niceMax(Math.max(1, ...series.flatMap((s) => s.values.filter((v) => v !== undefined))));
  yAxis(ctx, height, max);
  const dx = (width - AXIS) / Math.max(1, count - 1);
  for (const s of series) {
    ctx.strokeStyle = css(s.color);
    ctx.fillStyle = css(s.color);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === undefined) { pen = false; return; }
      const x = AXIS + i * dx, y = height - 1 - (v / max) * (height - 2);
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
      if (s.dots) ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
    });
    ctx.stroke();
  }
}

function drawQueues() {
  const steps = view.steps;
  drawLines($("queue-chart"), [
    { values: steps.map((s) => s.running), color: "--running" },
    { values: steps.map((s) => s.waiting), color: "--waiting" },
    { values: steps.map((s) => s.swapped), color: "--swapped" },
  ], STEPS_KEPT);
}

function drawThroughput() {
  const seconds = [...view.seconds.keys()].sort((a, b) => a - b);
  const last = seconds.length ? seconds[seconds.length - 1] : 0;
  const range = [];
  for (let s = last - SECONDS_KEPT + 1; s <= last; s++) range.push(view.seconds.get(s));
  drawLines($("throughput-chart"), [
    { values: range.map((b) => (b ? b.output : undefined)), color: "--output" },
    { values: range.map((b) => (b ? b.prompt : undefined)), color: "--prompt" },
  ], SECONDS_KEPT);
}

function drawLatency() {
  const l = view.latencies;
  drawLines($("latency-chart"), [
    { values: l.map((r) => r.ttft), color: "--ttft", dots: true },
    { values: l.map((r) => r.e2e), color: "--e2e", dots: true },
  ], Math.max(30, l.length));
}

function drawStepTime() {
  drawLines($("step-time-chart"), [
    { values: view.steps.map((s) => Math.round(s.duration_ms)), color: "--steptime" },
  ], STEPS_KEPT);
}

function sequenceColour(id) {
  return `hsl(${(id * 137.508) % 360}, 62%, 48%)`;
}

function drawBlockMap() {
  const map = view.blockMap;
  const canvas = $("block-map");
  if (!map) return;
  const { ctx, width, height } = canvasContext(canvas);
  const n = map.num_blocks;
  // Square cells as large as fit; past one pixel a cell, several blocks share a pixel.
  let cell = Math.max(1, Math.floor(Math.sqrt((width * height) / n)));
  while (cell > 1 && Math.ceil(n / Math.floor(width / cell)) * cell > height) cell -= 1;
  const columns = Math.max(1, Math.floor(width / cell));
  const perCell = Math.max(1, Math.ceil(n / (columns * Math.floor(height / cell))));
  const gap = cell >= 6 ? 1 : 0;
  const colours = { 0: css("--free"), "-1": css("--cached"), "-2": css("--shared") };
  const held = new Map();
  let block = 0, free = 0, cached = 0, used = 0;
  for (const [owner, count] of map.runs) {
    if (owner === 0) free += count;
    else if (owner === -1) cached += count;
    else used += count;
    if (owner > 0) held.set(owner, (held.get(owner) || 0) + count);
    ctx.fillStyle = owner > 0 ? sequenceColour(owner) : colours[owner];
    for (let i = 0; i < count; i++, block++) {
      if (block % perCell !== 0) continue;
      const c = block / perCell;
      ctx.fillRect((c % columns) * cell, Math.floor(c / columns) * cell, cell - gap, cell - gap);
    }
  }
  $("block-counts").textContent =
    `step ${map.step}: ${used} used, ${cached} cached, ${free} free of ${n}`;
  Object.assign(canvas.dataset, {
    draws: Number(canvas.dataset.draws) + 1, step: map.step, used, cached, free,
  });
  const legend = [...held.entries()].sort((a, b) => b[1] - a[1]).slice(0, 16);
  $("seq-legend").replaceChildren(...legend.map(([seq, blocks]) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = sequenceColour(seq);
    item.append(swatch, `seq ${seq}: ${blocks} blocks`);
    return item;
  }));
}

window.addEventListener("resize", draw);
connect();
