// errands.js: watch errands tasks live from a browser or a WeChat mini-program.
// One ES module, no dependencies. Served by every errands server at /client/errands.js.
//
//   import { watchTask } from "/client/errands.js";
//   const handle = watchTask("order-42", {
//     token,                                   // an owner token (eto_...), ideally task-scoped
//     onChange: (event) => render(event.task), // event: {type, seq, task}
//     onEnd: (task) => done(task),             // the task reached a final state
//     onError: (error) => console.warn(error), // transport trouble; the client keeps trying
//     onStream: (name, chunk, info) => show(handle.text("text")), // output, as it is made
//   });
//   handle.close();
//
// With onStream (or `streams: "include"`), the task's output streams come too: each chunk once,
// in order, whatever the reconnects; handle.text(name) is the text received so far and
// handle.chunks(name) its chunks (for a set watch, text(name, taskId)). info: {taskId, attempt,
// index, restarted}: a retry's attempt, or the same attempt run again after a worker gave it
// back, starts its streams over (restarted is true on its first chunk). A watch that starts at
// the task's current state receives what is written from then on; `after: 0` loads the past.
// `compact: true` asks the server for changed fields only (the client still hands onChange the
// whole task, merged).
//
// Transports, tried in this order unless `transport` says otherwise: Server-Sent Events
// (EventSource), WebSocket, then polling with backoff. Every transport resumes after the last
// event it delivered, and events are de-duplicated by `seq`, so a switch loses nothing.

const TASK_EVENTS = [
  "task.snapshot", "task.created", "task.processing", "task.progress", "task.retrying",
  "task.completed", "task.failed", "task.timeout", "task.cancelled", "task.notified", "task.stream",
];
const FINAL = new Set(["completed", "failed", "timeout", "cancelled"]);
const OPEN_FAILURES_BEFORE_FALLBACK = 2;

function query(params) {
  const parts = [];
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") {
      parts.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
    }
  }
  return parts.length ? `?${parts.join("&")}` : "";
}

function browserAdapter() {
  return {
    eventSource: typeof EventSource === "function" ? (url) => new EventSource(url) : null,
    connectSocket(url) {
      const ws = new WebSocket(url);
      return {
        send: (text) => ws.send(text),
        close: () => ws.close(),
        onOpen: (fn) => ws.addEventListener("open", fn),
        onMessage: (fn) => ws.addEventListener("message", (m) => fn(m.data)),
        onClose: (fn) => ws.addEventListener("close", fn),
        onError: (fn) => ws.addEventListener("error", fn),
      };
    },
    async request(url, headers, method = "GET", body = undefined) {
      const init = body === undefined ? { headers, method }
        : { headers: { ...headers, "Content-Type": "application/json" }, method, body: JSON.stringify(body) };
      const response = await fetch(url, init);
      const text = await response.text();
      return { status: response.status, data: text ? JSON.parse(text) : null };
    },
  };
}

/**
 * An adapter for WeChat mini-programs, which have wx.connectSocket and wx.request but no
 * EventSource:  watchTask(id, { token, baseUrl, adapter: wxAdapter(wx), onChange })
 */
export function wxAdapter(wx) {
  return {
    eventSource: null,
    connectSocket(url) {
      const task = wx.connectSocket({ url });
      return {
        send: (text) => task.send({ data: text }),
        close: () => task.close({}),
        onOpen: (fn) => task.onOpen(fn),
        onMessage: (fn) => task.onMessage((m) => fn(m.data)),
        onClose: (fn) => task.onClose(fn),
        onError: (fn) => task.onError(fn),
      };
    },
    request(url, headers, method = "GET", body = undefined) {
      return new Promise((resolve, reject) => {
        wx.request({
          url, header: body === undefined ? headers : { ...headers, "Content-Type": "application/json" },
          method, data: body,
          success: (r) => resolve({ status: r.statusCode, data: r.data }),
          fail: (e) => reject(new Error(e && e.errMsg ? e.errMsg : "request failed")),
        });
      });
    },
  };
}

class Watcher {
  constructor(kind, target, options) {
    this.kind = kind; // "task" or "tasks"
    this.target = target; // a task id, or a filter {type, status, owner}
    this.baseUrl = (options.baseUrl || "").replace(/\/$/, "");
    this.token = options.token || "";
    this.onChange = options.onChange || (() => {});
    this.onEnd = options.onEnd || (() => {});
    this.onError = options.onError || (() => {});
    this.onTransport = options.onTransport || (() => {});
    this.onStream = options.onStream || (() => {});
    this.streams = options.streams || (options.onStream ? "include" : "none");
    this.output = new Map(); // task id + "\u0000" + stream name -> {attempt, offset, chunks}
    // compact: the server sends only what changed; the client keeps each task whole.
    this.compact = Boolean(options.compact);
    this.tasks = new Map(); // task id -> the task as last known (compact only)
    this.pollMs = options.pollMs || 2000;
    this.adapter = options.adapter || browserAdapter();
    const wanted = options.transport || "auto";
    this.transports = wanted === "auto" ? ["sse", "ws", "poll"] : [wanted];
    if (!this.adapter.eventSource) this.transports = this.transports.filter((t) => t !== "sse");
    this.lastSeq = options.after ?? null;
    this.closed = false;
    this.current = null;
    this.timer = null;
    this.seen = new Map(); // task id -> seq, for polling a set of tasks
    this.next(0);
  }

  /** The chunks of stream `name` this watch received, of the latest run (`taskId`: for a set watch). */
  chunks(name, taskId) {
    const id = taskId ?? (this.kind === "task" ? this.target : null);
    if (id === null) throw new Error("a set watch's streams are per task: chunks(name, taskId)");
    const stream = this.output.get(`${id}\u0000${name}`);
    return stream ? stream.chunks.slice() : [];
  }

  /** The text of stream `name` this watch received (JSON chunks as JSON); see chunks(). */
  text(name, taskId) {
    return this.chunks(name, taskId).map((c) => (typeof c === "string" ? c : JSON.stringify(c))).join("");
  }

  stream(taskId, part) {
    const key = `${taskId}\u0000${part.name}`;
    let stream = this.output.get(key);
    if (stream && part.attempt < stream.attempt) return;
    let restarted = false;
    // A later attempt, or position 0 again (the same attempt run again), starts the stream over;
    // a watch that joins late starts where it joined (`after: 0` loads everything).
    if (!stream || part.attempt > stream.attempt || part.index === 0) {
      restarted = Boolean(stream);
      stream = { attempt: part.attempt, offset: part.index, chunks: [] };
      this.output.set(key, stream);
    }
    part.chunks.forEach((chunk, i) => {
      const index = part.index + i;
      if (index !== stream.offset + stream.chunks.length) return; // already have it
      stream.chunks.push(chunk);
      this.onStream(part.name, chunk, { taskId, attempt: part.attempt, index, restarted: restarted && i === 0 });
    });
  }

  close() {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.current) this.current();
    this.current = null;
  }

  next(index) {
    if (this.closed) return;
    const transport = this.transports[Math.min(index, this.transports.length - 1)];
    this.transportIndex = index;
    this.onTransport(transport);
    if (transport === "sse") this.sse();
    else if (transport === "ws") this.ws();
    else this.poll(0);
  }

  fallback(reason) {
    this.onError(new Error(reason));
    if (this.transportIndex < this.transports.length - 1) this.next(this.transportIndex + 1);
    else this.timer = setTimeout(() => this.next(this.transportIndex), this.pollMs);
  }

  // Deliver one item; returns true once the watch is over.
  deliver(type, data) {
    if (type === "tasks.snapshot") {
      for (const task of data.tasks) {
        if (this.compact) this.tasks.set(task.id, task);
        this.onChange({ type: "task.snapshot", seq: task.seq, task });
      }
      this.lastSeq = data.seq;
      return false;
    }
    if (type === "reset" || type === "overflow") return false;
    if (this.lastSeq !== null && data.seq <= this.lastSeq && type !== "task.snapshot") return false;
    this.lastSeq = data.seq;
    if (type === "task.stream") {
      if (this.streams !== "none") this.stream(data.task_id, data.stream);
      return false;
    }
    let task = data.task;
    if (this.compact) {
      task = type === "task.snapshot" ? task : { ...(this.tasks.get(task.id) || {}), ...task };
      this.tasks.set(task.id, task);
    }
    this.onChange({ type, seq: data.seq, task });
    if (this.kind === "task" && FINAL.has(task.status)) {
      this.closed = true;
      if (this.current) this.current();
      this.current = null;
      this.onEnd(task);
      return true;
    }
    return false;
  }

  path() {
    return this.kind === "task" ? `/v1/tasks/${encodeURIComponent(this.target)}/watch` : "/v1/watch";
  }

  sse() {
    const filter = this.kind === "tasks" ? this.target : {};
    const url = this.baseUrl + this.path() +
      query({ ...filter, access_token: this.token, after: this.lastSeq, streams: this.streams,
        compact: this.compact ? "true" : undefined });
    const source = this.adapter.eventSource(url);
    let opened = false;
    this.current = () => source.close();
    source.onopen = () => { opened = true; this.sseAttempts = 0; };
    for (const name of [...TASK_EVENTS, "tasks.snapshot", "reset", "overflow"]) {
      source.addEventListener(name, (message) => {
        if (!this.closed) this.deliver(name, JSON.parse(message.data));
      });
    }
    source.onerror = () => {
      if (this.closed) return;
      // After a dropped stream the browser reconnects by itself, sending Last-Event-ID.
      if (opened && source.readyState !== 2) return;
      source.close();
      if (opened) {
        this.timer = setTimeout(() => this.sse(), 1000); // the server refused a reconnect
        return;
      }
      this.sseAttempts = (this.sseAttempts || 0) + 1;
      if (this.sseAttempts >= OPEN_FAILURES_BEFORE_FALLBACK) this.fallback("event stream unavailable");
      else this.timer = setTimeout(() => this.sse(), 500);
    };
  }

  ws() {
    const base = this.baseUrl || (typeof location !== "undefined" ? location.origin : "");
    const url = base.replace(/^http/, "ws") + "/v1/ws" + query({ access_token: this.token });
    const socket = this.adapter.connectSocket(url);
    let opened = false;
    this.current = () => socket.close();
    socket.onOpen(() => {
      opened = true;
      this.wsAttempts = 0;
      const message = { op: "subscribe", sub: "w" };
      if (this.kind === "task") message.task_id = this.target;
      else message.filter = this.target;
      if (this.lastSeq !== null) message.after = this.lastSeq;
      message.streams = this.streams;
      if (this.compact) message.compact = true;
      socket.send(JSON.stringify(message));
    });
    socket.onMessage((text) => {
      if (this.closed) return;
      const message = JSON.parse(text);
      if (message.op === "error") {
        this.onError(new Error(message.error.message));
        return;
      }
      if (message.op === "end") return;
      if (message.event) this.deliver(message.event, message.data);
    });
    socket.onClose(() => {
      if (this.closed) return;
      this.wsAttempts = (this.wsAttempts || 0) + 1;
      if (!opened && this.wsAttempts >= OPEN_FAILURES_BEFORE_FALLBACK) this.fallback("websocket unavailable");
      else this.timer = setTimeout(() => this.ws(), Math.min(10000, 500 * 2 ** this.wsAttempts));
    });
    socket.onError(() => {});
  }

  async poll(failures) {
    if (this.closed) return;
    const headers = { Authorization: `Bearer ${this.token}` };
    let delay = this.pollMs;
    try {
      if (this.kind === "task") {
        const id = encodeURIComponent(this.target);
        if (this.lastSeq === null) {
          const r = await this.adapter.request(`${this.baseUrl}/v1/tasks/${id}`, headers);
          if (r.status !== 200) throw new Error(`HTTP ${r.status}`);
          if (this.deliver("task.snapshot", { seq: r.data.seq, task: r.data })) return;
        }
        const r = await this.adapter.request(
          `${this.baseUrl}/v1/tasks/${id}/events` + query({ after: this.lastSeq, streams: this.streams }), headers);
        if (r.status !== 200) throw new Error(`HTTP ${r.status}`);
        for (const event of r.data.events) {
          if (this.deliver(event.type, event)) return;
        }
      } else {
        const r = await this.adapter.request(
          `${this.baseUrl}/v1/tasks` + query({ ...this.target, limit: 200 }), headers);
        if (r.status !== 200) throw new Error(`HTTP ${r.status}`);
        for (const task of r.data.tasks.slice().reverse()) {
          if (this.seen.get(task.id) !== task.seq) {
            this.seen.set(task.id, task.seq);
            this.onChange({ type: "task.snapshot", seq: task.seq, task });
          }
        }
      }
      failures = 0;
    } catch (error) {
      failures += 1;
      delay = Math.min(30000, this.pollMs * 2 ** failures);
      this.onError(error);
    }
    if (!this.closed) this.timer = setTimeout(() => this.poll(failures), delay);
  }
}

async function call(method, path, body, options) {
  const adapter = options.adapter || browserAdapter();
  const headers = options.token ? { Authorization: `Bearer ${options.token}` } : {};
  const r = await adapter.request(`${(options.baseUrl || "").replace(/\/$/, "")}${path}`, headers, method, body);
  if (r.status >= 400) {
    const error = (r.data && r.data.error) || { code: "http_error", message: `HTTP ${r.status}` };
    throw Object.assign(new Error(error.message), { status: r.status, code: error.code });
  }
  return r.data;
}

/**
 * Submit a task: `body` is a POST /v1/tasks body ({type, input, id, run_at, delay_s,
 * start_within_s, key, debounce_key, debounce_s, ...}); resolves to the task, rejects with an Error carrying `status` and
 * `code`. Options: {token, baseUrl, adapter}, as for watchTask.
 */
export function submitTask(body, options = {}) {
  return call("POST", "/v1/tasks", body, options);
}

/**
 * Submit up to 1,000 tasks in one transaction; resolves to one result per task, in order:
 * {status, task} when accepted (202 created, 200 the same request again), {status, error} when
 * refused (one refused task refuses only itself).
 */
export async function submitTasks(tasks, options = {}) {
  return (await call("POST", "/v1/tasks/batch", { tasks }, options)).results;
}

/**
 * The credits of the token's owner: {owner, balance (what it may spend), reserved (what its
 * unfinished tasks hold), updated_at}.
 */
export async function getBalance(options = {}) {
  return (await call("GET", "/v1/credits", undefined, options)).balances[0];
}

/**
 * Usage per day (UTC), owner and type: `filter` {since, until ("YYYY-MM-DD"), type, owner (admin),
 * after, limit}; resolves to {since, until, usage: [{day, owner, type, submitted, statuses,
 * credits_charged, credits_reserved}], next_after}.
 */
export function getUsage(filter = {}, options = {}) {
  return call("GET", "/v1/usage" + query(filter), undefined, options);
}

/** Watch one task until it ends. Returns a handle with close(). */
export function watchTask(id, options = {}) {
  return new Watcher("task", id, options);
}

/** Watch the caller's tasks that match `filter` ({type, status, owner}). Returns a handle with close(). */
export function watchTasks(filter = {}, options = {}) {
  return new Watcher("tasks", filter, options);
}
