// The errands console: a client of errands' public API, served by errands itself (no build step,
// no CDN). The key or token is kept in sessionStorage and sent in the Authorization header only,
// never in a URL: the live list reads the set watch (SSE) through fetch, not EventSource.

const STATUSES = ["pending", "processing", "completed", "failed", "timeout", "cancelled"];
const FINAL = new Set(["completed", "failed", "timeout", "cancelled"]);
const KEY = "errands.console.token";
const $ = (selector) => document.querySelector(selector);

const state = { token: null, admin: false, watch: null, rows: new Map(), cursor: null };
// Where errands' API is: the folder above this file's (/console/console.js at a server's root,
// /errands/console/console.js where an app mounts errands at /errands).
const ROOT = new URL("..", import.meta.url);
/** An API path (``/v1/…``) as a URL below errands' root. */
const at = (path) => new URL(path.replace(/^\//, ""), ROOT);

// -- the API -----------------------------------------------------------------------------------

async function api(path, { method = "GET", body, params } = {}) {
  const url = at(path);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const response = await fetch(url, {
    method,
    headers: { Authorization: `Bearer ${state.token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = new Error(data?.error?.message || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

/** Server-Sent Events through fetch (the token in a header), resumed after the last id. */
async function follow(path, params, onEvent, signal) {
  let lastId = null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const url = at(path);
      for (const [key, value] of Object.entries(params)) if (value) url.searchParams.set(key, value);
      const headers = { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = String(lastId);
      const response = await fetch(url, { headers, signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setLive(true);
      delay = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = { id: null, event: "message", data: "" };
          for (const line of buffer.slice(0, end).split("\n")) {
            const colon = line.indexOf(":");
            if (colon <= 0) continue;
            const field = line.slice(0, colon);
            const text = line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") frame.data += text;
            else if (field in frame) frame[field] = text;
          }
          buffer = buffer.slice(end + 2);
          if (frame.id !== null) lastId = Number(frame.id);
          if (frame.data) onEvent(frame.event, JSON.parse(frame.data));
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10_000);
  }
}

function setLive(on) {
  const live = $("#live");
  if (live) live.textContent = on ? "live: changes appear as they happen" : "reconnecting…";
}

// -- small DOM helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value; // through the CSSOM: the page's CSP allows no style attributes
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Children as a list of nodes: nested lists flattened, absent parts left out. */
const parts = (...children) => children.flat(2).filter((child) => child !== null && child !== undefined && child !== false);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const json = (value) => el("pre", {}, JSON.stringify(value, null, 2));

function fields(pairs) {
  return el("dl", { class: "fields" }, pairs.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value ?? "")]));
}

// -- signing in --------------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    await api("/v1/stats");
    state.admin = true;
  } catch (error) {
    if (error.status !== 403) {
      state.token = null;
      throw error;
    }
    state.admin = false; // an owner token: its own tasks only
  }
  sessionStorage.setItem(KEY, token);
  $("#who").textContent = state.admin ? "signed in with the admin key" : "signed in with an owner token";
  for (const node of document.querySelectorAll("[data-admin]")) node.hidden = !state.admin;
  $("#nav").hidden = false;
  $("#sign-out").hidden = false;
  $("#sign-in").hidden = true;
  route();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.hash = "";
  location.reload();
}

// -- the views ---------------------------------------------------------------------------------

function show(view) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("current", link.dataset.view === view);
}

function route() {
  if (!state.token) return;
  const [, view, id] = location.hash.split("/");
  if (view === "task" && id) return showTask(decodeURIComponent(id));
  if (view === "charts" && state.admin) return showCharts("hour");
  if (view === "endpoints" && state.admin) return showEndpoints();
  return showTasks();
}

// -- tasks, live -------------------------------------------------------------------------------

function selection() {
  const form = new FormData($("#filters"));
  const out = {};
  for (const [key, value] of form.entries()) {
    if (!value) continue;
    out[key] = key.startsWith("created_") ? new Date(value).toISOString() : value;
  }
  if (!state.admin) delete out.owner;
  return out;
}

function matches(task, sel) {
  if (sel.status && task.status !== sel.status) return false;
  if (sel.type && task.type !== sel.type) return false;
  if (sel.owner && task.owner !== sel.owner) return false;
  if (sel.id_prefix && !task.id.startsWith(sel.id_prefix)) return false;
  if (sel.created_after && task.created_at < sel.created_after) return false;
  if (sel.created_before && task.created_at >= sel.created_before) return false;
  return true;
}

function row(task) {
  const progress = task.progress ?? (task.status === "completed" ? 100 : null);
  return el(
    "tr",
    { "data-id": task.id, "data-status": task.status, onclick: () => (location.hash = `#/task/${encodeURIComponent(task.id)}`) },
    el("td", {}, task.id),
    el("td", {}, task.type),
    state.admin ? el("td", {}, task.owner) : null,
    el("td", { class: `status s-${task.status}` }, task.status),
    el(
      "td",
      {},
      progress === null ? "" : el("span", { class: "bar", title: `${progress}%` }, el("span", { style: `width:${progress}%` })),
      task.message ? el("span", { class: "msg" }, task.message) : null,
    ),
    el("td", {}, when(task.created_at)),
    el("td", {}, when(task.updated_at)),
  );
}

function put(task, { first = false } = {}) {
  const old = state.rows.get(task.id);
  const fresh = row(task);
  if (old) old.replaceWith(fresh);
  else if (first) $("#tasks tbody").prepend(fresh);
  else $("#tasks tbody").append(fresh);
  state.rows.set(task.id, fresh);
}

let countsTimer = null;
function countsSoon() {
  if (countsTimer === null) countsTimer = setTimeout(() => { countsTimer = null; loadCounts(); }, 700);
}

async function loadCounts() {
  const sel = selection();
  const { by_status: counts } = await api("/v1/tasks/count", { params: { ...sel, by: "status" } });
  const shown = sel.status ? [sel.status] : STATUSES;
  $("#counts").replaceChildren(
    ...shown.map((status) => el("span", { class: `count s-${status}`, "data-status": status }, `${status} `, el("b", {}, counts[status]))),
  );
}

async function loadPage(more = false) {
  const page = await api("/v1/tasks", { params: { ...selection(), limit: 50, cursor: more ? state.cursor : null } });
  for (const task of page.tasks) put(task);
  state.cursor = page.next_cursor;
  $("#more").hidden = !page.next_cursor;
}

/** A new watch for the view about to be drawn: the one before is stopped first (a view that
 * is left while it loads must not keep its watch). */
function newWatch() {
  if (state.watch) state.watch.abort();
  state.watch = new AbortController();
  return state.watch;
}

async function showTasks() {
  show("tasks");
  const watch = newWatch();
  state.rows.clear();
  $("#tasks tbody").replaceChildren();
  const sel = selection();
  const since = new Date().toISOString(); // tasks created after the list's read come from the watch
  await Promise.all([loadPage(), loadCounts()]);
  if (watch.signal.aborted) return;
  // The set watch narrows by type and owner on the server; the status is checked here, so that
  // a task entering the selected status appears and one leaving it is shown as it is now.
  const params = { type: sel.type, owner: sel.owner };
  follow("/v1/watch", params, (event, data) => {
    // The snapshot holds the unfinished tasks as the watch starts: those created between the
    // list's read and the watch's start are in it (older ones are the list's).
    const tasks = data.task ? [data.task] : [...(data.tasks || [])].reverse();
    for (const task of tasks) {
      if (state.rows.has(task.id)) put(task);
      else if (matches(task, sel) && (data.task ? data.type === "task.created" || sel.status : task.created_at >= since)) {
        put(task, { first: true });
      }
    }
    countsSoon();
  }, watch.signal);
}

async function bulk(action) {
  const sel = selection();
  const applies = action === "cancel" ? ["pending", "processing"] : ["failed", "timeout"];
  const statuses = sel.status ? [sel.status].filter((s) => applies.includes(s)) : applies;
  const { by_status: counts } = await api("/v1/tasks/count", { params: { ...sel, by: "status" } });
  const total = statuses.reduce((sum, status) => sum + counts[status], 0);
  if (!total) return void ($("#bulk-status").textContent = `no task to ${action}`);
  if (!confirm(`${action === "cancel" ? "Cancel" : "Retry"} ${total} task${total === 1 ? "" : "s"}?`)) return;
  const { status: _, ...rest } = sel;
  let cursor = null, done = 0, skipped = 0;
  do {
    const body = { action, selection: sel.status ? sel : rest, limit: 500, cursor };
    const result = await api("/v1/tasks/bulk", { method: "POST", body });
    done += result.done;
    skipped += result.skipped;
    cursor = result.next_cursor;
    $("#bulk-status").textContent = `${action}: ${done} done, ${skipped} skipped…`;
  } while (cursor);
  $("#bulk-status").textContent = `${action}: ${done} done, ${skipped} skipped`;
  showTasks();
}

// -- one task ----------------------------------------------------------------------------------

async function showTask(id) {
  show("task");
  const watch = newWatch();
  const view = $("#view-task");
  const draw = async () => {
    const task = await api(`/v1/tasks/${encodeURIComponent(id)}`);
    const [events, streams, deliveries, messages] = await Promise.all([
      api(`/v1/tasks/${encodeURIComponent(id)}/events`),
      api(`/v1/tasks/${encodeURIComponent(id)}/streams`).catch(() => ({ streams: [] })),
      state.admin ? api("/v1/webhook-deliveries", { params: { task_id: id } }) : { deliveries: [] },
      state.admin ? api("/v1/messages", { params: { task_id: id } }) : { messages: [] },
    ]);
    const act = (action) => async () => {
      try {
        await api(`/v1/tasks/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      } catch (error) {
        alert(error.message);
      }
      draw();
    };
    view.replaceChildren(...parts(
      el("p", {}, el("a", { href: "#/tasks" }, "← tasks")),
      el("h1", {}, `${task.type} `, el("code", {}, task.id), " ", el("span", { class: `status s-${task.status}`, id: "task-status" }, task.status)),
      el(
        "div",
        { class: "actions" },
        ["pending", "processing"].includes(task.status) ? el("button", { id: "cancel", onclick: act("cancel") }, "Cancel") : null,
        ["failed", "timeout"].includes(task.status) ? el("button", { id: "retry", onclick: act("retry") }, "Retry") : null,
      ),
      fields([
        ["owner", task.owner], ["attempt", `${task.attempt} of ${task.max_attempts}`], ["progress", task.progress],
        ["message", task.message], ["created", when(task.created_at)], ["started", when(task.started_at)],
        ["finished", when(task.finished_at)], ["scheduled for", when(task.scheduled_for)], ["waiting for", task.waiting_for],
        ["key", task.key], ["external id", task.external_id],
      ]),
      el("h2", {}, "Input"), json(task.input),
      task.error ? [el("h2", {}, "Error"), json(task.error)] : null,
      task.result !== null && task.result !== undefined ? [el("h2", {}, "Result"), json(task.result)] : null,
      el("h2", {}, "Timeline"),
      el("table", { id: "timeline" }, el("tbody", {}, events.events.map((e) =>
        el("tr", {}, el("td", {}, e.seq), el("td", {}, e.type), el("td", {}, when(e.at)), el("td", {}, e.task?.status || ""), el("td", {}, e.task?.message || ""))))),
      streams.streams.length ? [el("h2", {}, "Output streams"), el("ul", { id: "streams" }, streams.streams.map((s) => el("li", {},
        `${s.name} (attempt ${s.attempt}): ${s.chunks} chunks, ${s.bytes} bytes `,
        el("button", { onclick: (e) => showStream(e.target, id, s) }, "Show"))))] : null,
      state.admin ? [el("h2", {}, "Inbound webhooks"), deliveries.deliveries.length
        ? el("table", {}, el("tbody", {}, deliveries.deliveries.map((d) => el("tr", {}, el("td", {}, d.provider), el("td", {}, d.outcome), el("td", {}, d.status_code), el("td", {}, when(d.received_at)), el("td", {}, d.detail || "")))))
        : el("p", {}, "none")] : null,
      state.admin ? [el("h2", {}, "Outbound messages"), messages.messages.length
        ? el("table", { id: "messages" }, el("tbody", {}, messages.messages.map((m) => el("tr", {},
            el("td", {}, m.channel), el("td", {}, m.event_type), el("td", {}, m.state), el("td", {}, `${m.attempts} attempts`),
            el("td", {}, m.last_status ?? ""), el("td", {}, m.last_error || ""),
            el("td", {}, el("button", { onclick: async (e) => { e.stopPropagation(); await api(`/v1/messages/${m.id}/resend`, { method: "POST" }); draw(); } }, "Resend"),
              " ", el("button", { onclick: async (e) => { e.stopPropagation(); const full = await api(`/v1/messages/${m.id}`); e.target.closest("tr").after(el("tr", {}, el("td", { colspan: 7 }, json(full.attempt_log)))); } }, "Attempts"))))))
        : el("p", {}, "none")] : null,
    ));
  };
  await draw();
  if (watch.signal.aborted) return;
  let pending = null;
  // With its streams: what the task writes redraws the page too (at most every 300 ms). The
  // watch of a task ends with the task: then it is not opened again (the page stays drawn).
  const stream = new AbortController();
  watch.signal.addEventListener("abort", () => stream.abort());
  follow(`/v1/tasks/${encodeURIComponent(id)}/watch`, { streams: "include" }, (event, data) => {
    pending ??= setTimeout(() => { pending = null; if (!watch.signal.aborted) draw(); }, 300);
    if (FINAL.has(data.task?.status)) stream.abort();
  }, stream.signal);
}

/** A stream's text (or JSON lines) as written so far, under its line in the list. */
async function showStream(button, id, stream) {
  const path = `/v1/tasks/${encodeURIComponent(id)}/streams/${encodeURIComponent(stream.name)}`;
  const url = at(path);
  url.searchParams.set("attempt", stream.attempt);
  const response = await fetch(url, { headers: { Authorization: `Bearer ${state.token}` } });
  const text = await response.text();
  button.closest("li").querySelector("pre")?.remove();
  button.closest("li").append(el("pre", { class: "stream" }, response.ok ? text : `HTTP ${response.status}`));
}

// -- charts ------------------------------------------------------------------------------------

async function showCharts(window) {
  show("charts");
  newWatch();
  const series = await api("/v1/stats/series", { params: { window } });
  const width = 900, height = 200, pad = 24;
  const peak = Math.max(1, ...series.buckets.map((b) => b.submitted + b.completed + b.failed));
  const step = (width - pad) / series.buckets.length;
  const colors = { submitted: "#98a2b3", completed: "#12b76a", failed: "#f04438" };
  const bars = [];
  series.buckets.forEach((b, i) => {
    let y = height - pad;
    for (const kind of ["failed", "completed", "submitted"]) {
      const h = ((height - 2 * pad) * b[kind]) / peak;
      if (h > 0) bars.push(`<rect x="${pad + i * step}" y="${y - h}" width="${Math.max(1, step - 1)}" height="${h}" fill="${colors[kind]}"><title>${b.at} ${kind}: ${b[kind]}</title></rect>`);
      y -= h;
    }
  });
  const svg = el("div", { id: "chart" });
  svg.innerHTML = `<svg viewBox="0 0 ${width} ${height}" width="100%" role="img" aria-label="tasks per step">
    <text x="0" y="12">${peak}</text><text x="${pad}" y="${height - 6}">${new Date(series.buckets[0].at).toLocaleTimeString()}</text>
    <text x="${width - 60}" y="${height - 6}">now</text>${bars.join("")}</svg>`; // numbers and ISO times only
  $("#view-charts").replaceChildren(
    el("h1", {}, `Tasks per ${series.step_s === 60 ? "minute" : "15 minutes"}, last ${window}`),
    el("div", { class: "actions" },
      el("button", { onclick: () => showCharts("hour") }, "Last hour"), el("button", { onclick: () => showCharts("day") }, "Last day")),
    el("p", { class: "legend" }, Object.entries(colors).map(([k, c]) => el("span", {}, el("i", { style: `background:${c}` }), k))),
    svg,
    el("h2", {}, "Queue wait and run time by type (seconds)"),
    el("table", { id: "timings" },
      el("thead", {}, el("tr", {}, ["type", "queue p50", "queue p95", "run p50", "run p95", "runs"].map((h) => el("th", {}, h)))),
      el("tbody", {}, Object.entries(series.by_type).map(([type, t]) => el("tr", {},
        el("td", {}, type), [t.queue_wait_s.p50, t.queue_wait_s.p95, t.run_time_s.p50, t.run_time_s.p95].map((v) => el("td", {}, v === null ? "" : v.toFixed(3))),
        el("td", {}, t.run_time_s.n))))),
  );
}

// -- endpoints and providers --------------------------------------------------------------------

async function showEndpoints() {
  show("endpoints");
  newWatch();
  const [{ endpoints }, stats] = await Promise.all([api("/v1/endpoints"), api("/v1/stats")]);
  const change = (id, body) => async () => {
    const answer = await api(`/v1/endpoints/${id}`, { method: "PATCH", body });
    if (answer.secret) alert(`The new signing secret (shown once):\n${answer.secret}`);
    showEndpoints();
  };
  const recover = (id) => async () => {
    const since = prompt("Resend the messages that failed since (ISO 8601):", new Date(Date.now() - 3600_000).toISOString());
    if (!since) return;
    await api(`/v1/endpoints/${id}/recover`, { method: "POST", body: { since } });
    showEndpoints();
  };
  $("#view-endpoints").replaceChildren(
    el("h1", {}, "Endpoints"),
    el("table", { id: "endpoints" },
      el("thead", {}, el("tr", {}, ["url", "health", "failing since", "throttled until", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, endpoints.map((e) => el("tr", { "data-id": e.id },
        el("td", {}, e.url, e.description ? el("span", { class: "msg" }, e.description) : null),
        el("td", { class: e.enabled ? "s-completed" : "s-failed" }, e.enabled ? "enabled" : `disabled${e.disabled_reason ? `: ${e.disabled_reason}` : ""}`),
        el("td", {}, when(e.failing_since)), el("td", {}, when(e.throttled_until)),
        el("td", {},
          el("button", { onclick: change(e.id, { enabled: !e.enabled }) }, e.enabled ? "Disable" : "Enable"), " ",
          el("button", { onclick: change(e.id, { rotate_secret: true }) }, "Rotate secret"), " ",
          el("button", { onclick: recover(e.id) }, "Recover failed…")))))),
    el("h2", {}, "Providers asking to wait"),
    Object.keys(stats.providers_held).length
      ? el("ul", {}, Object.entries(stats.providers_held).map(([name, until]) => el("li", {}, `${name}: until ${when(until)}`)))
      : el("p", {}, "none"),
  );
}

// -- start -------------------------------------------------------------------------------------

$("#sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#sign-in-error").textContent = "";
  try {
    await signIn($("#token").value.trim());
  } catch (error) {
    $("#sign-in-error").textContent = error.status === 401 ? "This key or token is not valid." : error.message;
  }
});
$("#sign-out").addEventListener("click", signOut);
$("#filters").addEventListener("submit", (event) => { event.preventDefault(); showTasks(); });
$("#filters").addEventListener("reset", () => setTimeout(showTasks));
$("#more").addEventListener("click", () => loadPage(true));
$("#bulk-cancel").addEventListener("click", () => bulk("cancel"));
$("#bulk-retry").addEventListener("click", () => bulk("retry"));
window.addEventListener("hashchange", route);

const saved = sessionStorage.getItem(KEY);
if (saved) signIn(saved).catch(() => { sessionStorage.removeItem(KEY); $("#sign-in").hidden = false; });
else $("#sign-in").hidden = false;
