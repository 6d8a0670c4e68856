// The engine observer: renders the ops server's /status snapshots, streamed on /ui/events.
//
// The feed sends a snapshot every tick (half a second by default), so a quiet
// feed means something: after STALE_AFTER ms without one, the page asks
// /ui/pulse on a new connection (every response here says Connection: close,
// so the browser holds no idle one). While the loop is stalled the loop watch
// thread answers that request with 503 and the stall, which the banner shows.
"use strict";

const STALE_AFTER = 1500;      // ms without a snapshot before the page asks /ui/pulse
const FLASH_FOR = 3000;        // ms a restart or a stall stays highlighted
const HISTORY = 240;           // samples kept per source for its sparkline
const RATE_FIELDS = ["delivered", "sent", "offered", "published", "received", "processed"];

const view = {
  lastMessage: 0,
  pulsing: false,
  stallSince: null,            // Date.now() of the stall's start, once the pulse saw it
  counters: new Map(),         // child path -> {restarts, stalls}
  flashes: new Map(),          // child path -> Date.now() until which it is highlighted
  history: new Map(),          // source row -> {depths: number[], last: [clock, count]}
  stalls: [],                  // loop stalls seen, newest first
  lastStallKey: null,
  actions: false,
  token: null,
};

const $ = (id) => document.getElementById(id);

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(0)} s`;
}

function clockTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// A trio time of the snapshot as a wall-clock time.
function wallOf(frame, t) {
  return (frame.wall - (frame.clock - t)) * 1000;
}

function connect() {
  const events = new EventSource("/ui/events");
  events.onmessage = (message) => receive(JSON.parse(message.data));
  events.onerror = () => setLive("stale", "reconnecting");
}

function receive(message) {
  view.lastMessage = Date.now();
  view.stallSince = null;
  $("stale").hidden = true;
  setLive("live", "live");
  const frame = message.snapshot;
  $("updated").textContent = `updated ${clockTime(frame.wall * 1000)}`;
  $("dropped").textContent = message.dropped ? `${message.dropped} updates dropped (slow viewer)` : "";
  render(frame);
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.state = state;
  live.textContent = text;
}

async function pulse() {
  if (view.pulsing || Date.now() - view.lastMessage < STALE_AFTER) return;
  view.pulsing = true;
  try {
    const response = await fetch("/ui/pulse", { cache: "no-store" });
    const body = await response.json();
    if (Date.now() - view.lastMessage < STALE_AFTER) return;  // the feed came back meanwhile
    const stall = (body.problems || []).find((p) => p.kind === "loop_stalled");
    if (response.status === 503 && stall) {
      showStall(stall);
    } else {
      setLive("stale", "reconnecting");
    }
  } catch (error) {
    setLive("stale", "unreachable");
    showBanner("the ops server does not answer");
  } finally {
    view.pulsing = false;
  }
}

function showStall(stall) {
  if (view.stallSince === null) view.stallSince = Date.now() - (stall.seconds || 0) * 1000;
  const task = stall.subject ? `in task '${stall.subject}'` : "in an unsampled task";
  const where = stall.where ? ` at ${stall.where}` : "";
  setLive("stale", "stale");
  showBanner(`event loop blocked since ${clockTime(view.stallSince)} ` +
             `(${seconds(stall.seconds)}) ${task}${where}`);
}

function showBanner(text) {
  const banner = $("stale");
  banner.textContent = text;
  banner.hidden = false;
}

function render(frame) {
  const status = frame.status;
  const work = [];
  $("tree").innerHTML = status.supervisor
    ? `<ul class="tree">${supervisorNode(frame, status.supervisor, status.supervisor.name, work)}</ul>`
    : `<p class="muted">no supervisor</p>`;
  renderSources(frame, status.sources || {}, work);
  renderWork(frame, work);
  renderPairs($("bridges"), status.bridges || {});
  renderLoop(status.loop);
}

function supervisorNode(frame, sup, path, work) {
  const failed = sup.failed ? ` <span class="state state-failed">gave up</span>` : "";
  const children = sup.children.map((c) => childNode(frame, c, `${path}/${c.name}`, work)).join("");
  return `<li class="sup" data-path="${esc(path)}"><div class="node"><span class="name">${esc(sup.name)}</span>` +
         `<span class="muted">${esc(sup.strategy)}, ${sup.restarts_in_period}/${sup.max_restarts} ` +
         `restarts in ${sup.period} s</span>${failed}</div><ul>${children}</ul></li>`;
}

function childNode(frame, child, path, work) {
  noteChanges(path, child);
  const flash = (view.flashes.get(path) || 0) > Date.now() ? " flash" : "";
  const error = child.last_error
    ? `<span class="error" title="at ${esc(clockTime(wallOf(frame, child.last_error_at)))}">${esc(child.last_error)}</span>`
    : "";
  const heartbeat = child.heartbeat_age === null ? "" :
    `<span class="muted">heartbeat ${seconds(child.heartbeat_age)} ago` +
    `${child.stall_after === null ? "" : ` (limit ${child.stall_after} s)`}</span>`;
  const stop = view.actions && child.state !== "stopped" && path.split("/").length === 2
    ? `<button data-stop="${esc(child.name)}">stop</button>` : "";
  let inner = "";
  for (const item of child.attached || []) {
    if (item.type === "SupervisorStatistics") {
      inner += supervisorNode(frame, item, `${path}/${item.name}`, work);
    } else {
      work.push({ path, item });
    }
  }
  return `<li data-path="${esc(path)}" data-state="${esc(child.state)}" data-restarts="${child.restarts}" ` +
         `data-stalls="${child.stalls}"><div class="node${flash}">` +
         `<span class="name">${esc(child.name)}</span>` +
         `<span class="state state-${esc(child.state)}">${esc(child.state)}</span>` +
         `<span>restarts ${child.restarts}</span><span>stalls ${child.stalls}</span>` +
         `${heartbeat}${error}${stop}</div>${inner ? `<ul>${inner}</ul>` : ""}</li>`;
}

// A restart or a stall since the last snapshot highlights the child for FLASH_FOR.
function noteChanges(path, child) {
  const before = view.counters.get(path);
  if (before && (child.restarts > before.restarts || child.stalls > before.stalls)) {
    view.flashes.set(path, Date.now() + FLASH_FOR);
  }
  view.counters.set(path, { restarts: child.restarts, stalls: child.stalls });
}

// Queue-like things (anything with a depth) inside each source: channels,
// hub subscriptions, broadcast clients.
function queues(name, stats, found) {
  if (stats === null || typeof stats !== "object") return;
  if (typeof stats.depth === "number" || typeof stats.queued === "number") found.push([name, stats]);
  for (const [key, value] of Object.entries(stats)) {
    if (!Array.isArray(value)) continue;
    value.forEach((item, i) => {
      const label = item && (item.name || item.id || (item.patterns && item.patterns.join(",")));
      queues(`${name}/${label || `${key}[${i}]`}`, item, found);
    });
  }
}

function renderSources(frame, sources, work) {
  const rows = [];
  for (const [name, stats] of Object.entries(sources)) {
    if (stats && typeof stats.total === "number" && typeof stats.completed === "number") {
      work.push({ path: name, item: stats });
    }
    queues(name, stats, rows);
  }
  $("sources").tBodies[0].innerHTML = rows.map(([name, s]) => sourceRow(frame, name, s)).join("") ||
    `<tr><td colspan="5" class="muted">none</td></tr>`;
}

function sourceRow(frame, name, s) {
  const depth = typeof s.depth === "number" ? s.depth : s.queued;
  const field = RATE_FIELDS.find((f) => typeof s[f] === "number");
  const count = field ? s[field] : null;
  const dropped = typeof s.dropped === "number" ? s.dropped
    : Object.values(s.dropped_by_reason || {}).reduce((a, b) => a + b, 0);
  let entry = view.history.get(name);
  if (!entry) view.history.set(name, (entry = { depths: [], last: null, rate: null }));
  if (entry.last && count !== null && frame.clock > entry.last[0]) {
    entry.rate = (count - entry.last[1]) / (frame.clock - entry.last[0]);
  }
  if (count !== null) entry.last = [frame.clock, count];
  entry.depths.push(depth);
  if (entry.depths.length > HISTORY) entry.depths.shift();
  const rate = entry.rate === null ? "–" : entry.rate.toFixed(entry.rate < 10 ? 1 : 0);
  return `<tr data-source="${esc(name)}"><td>${esc(name)}</td><td>${depth}</td><td>${rate}</td>` +
         `<td>${dropped}</td><td>${sparkline(entry.depths)}</td></tr>`;
}

function sparkline(values) {
  const top = Math.max(1, ...values);
  const step = 160 / Math.max(1, HISTORY - 1);
  const start = 160 - step * (values.length - 1);
  const points = values.map((v, i) => `${(start + i * step).toFixed(1)},${(23 - (v / top) * 22).toFixed(1)}`);
  return `<svg class="spark" viewBox="0 0 160 24"><polyline points="${points.join(" ")}"/></svg>`;
}

function renderWork(frame, work) {
  const rows = work.map(({ path, item }) => {
    if (typeof item.total === "number" && typeof item.completed === "number") {
      return `<p data-batch="${esc(path)}"><b>${esc(path)}</b> batch ` +
             `<progress max="${item.total}" value="${item.completed}"></progress> ` +
             `${item.completed}/${item.total} (${item.error || 0} errors, ${item.timeout || 0} timeouts, ` +
             `${item.in_flight || 0} in flight)</p>`;
    }
    if (item.type === "CycleStatistics") {
      const last = item.last_success_at === null ? "never" : clockTime(wallOf(frame, item.last_success_at));
      const next = item.next_tick_at === null ? "–" : clockTime(wallOf(frame, item.next_tick_at));
      const error = item.last_error ? ` <span class="error">${esc(item.last_error)}</span>` : "";
      return `<p data-cycle="${esc(item.name)}"><b>${esc(path)}</b> cycle ${esc(item.name)}: ` +
             `${item.runs} runs, ${item.failures} failed, ${item.timeouts} timed out; ` +
             `last success ${last}, next due ${next}${error}</p>`;
    }
    const label = item.name ? ` ${esc(item.name)}` : "";
    return `<p><b>${esc(path)}</b> ${esc(item.type || "")}${label}</p>`;
  });
  $("work").innerHTML = rows.join("") || `<p class="muted">none</p>`;
}

function renderPairs(list, pairs) {
  list.innerHTML = Object.entries(pairs)
    .filter(([key, value]) => key !== "type" && typeof value !== "object")
    .map(([key, value]) => `<dt>${esc(key.replaceAll("_", " "))}</dt><dd>${esc(value)}</dd>`)
    .join("");
}

function renderLoop(loop) {
  if (!loop) {
    $("loop").innerHTML = `<dt>stall detector</dt><dd>off</dd>`;
    return;
  }
  renderPairs($("loop"), {
    stalls: loop.stalls,
    "longest stall": seconds(loop.stall_seconds_max),
    "total stalled": seconds(loop.stall_seconds_total),
    threshold: seconds(loop.threshold),
  });
  const last = loop.last_stall;
  const key = `${loop.stalls}`;
  if (last && key !== view.lastStallKey) {
    view.lastStallKey = key;
    view.stalls.unshift({ at: Date.now(), ...last });
    view.stalls.length = Math.min(view.stalls.length, 20);
  }
  $("stalls").innerHTML = view.stalls.map((s) =>
    `<li>${clockTime(s.at)}: ${seconds(s.seconds)} in task <code>${esc(s.task || "?")}</code>` +
    `${s.where ? ` at <code>${esc(s.where)}</code>` : ""}</li>`).join("");
}

async function stopChild(name) {
  if (view.token === null) view.token = window.prompt("ops token");
  if (!view.token) return;
  const response = await fetch("/ui/actions/stop", {
    method: "POST",
    headers: { "Authorization": `Bearer ${view.token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ child: name }),
  });
  if (response.status === 401) view.token = null;
  if (!response.ok) window.alert((await response.json()).error);
}

document.addEventListener("click", (event) => {
  const name = event.target.dataset && event.target.dataset.stop;
  if (name) stopChild(name);
});

fetch("/ui/pulse", { cache: "no-store" })
  .then((r) => r.json())
  .then((body) => { view.actions = Boolean(body.actions); })
  .catch(() => {});
view.lastMessage = Date.now();
connect();
setInterval(pulse, 250);
