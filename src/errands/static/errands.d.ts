// Types of errands.js (served at /client/errands.d.ts beside /client/errands.js). Checked by
// `tsc` in the test suite against tests/js/check.ts.

export type Status = "pending" | "processing" | "completed" | "failed" | "timeout" | "cancelled";

export interface TaskError {
  code: string;
  message: string;
}

/** A task as the API gives it (docs/api.md, "The task object"). */
export interface Task {
  id: string;
  type: string;
  owner: string;
  status: Status;
  input: unknown;
  result: unknown;
  error: TaskError | null;
  progress: number;
  message: string | null;
  attempt: number;
  max_attempts: number;
  priority: number;
  created_at: string;
  updated_at: string;
  started_at: string | null;
  finished_at: string | null;
  expires_at: string | null;
  scheduled_for: string | null;
  start_by: string | null;
  waiting_for: "schedule" | "provider" | "concurrency" | "rate" | null;
  key: string | null;
  debounce_key: string | null;
  seq: number;
  [field: string]: unknown;
}

/** What onChange receives: the event's type and seq, and the task after it (whole). */
export interface TaskChange {
  type: string;
  seq: number;
  task: Task;
}

export interface StreamInfo {
  taskId: string;
  attempt: number;
  index: number;
  /** A retry (or the same attempt run again) starts its streams over: true on its first chunk. */
  restarted: boolean;
}

export type Transport = "sse" | "ws" | "poll";

/** How a watch reaches the server: the browser's own (default), or wxAdapter(wx). */
export interface Adapter {
  eventSource: ((url: string) => EventSource) | null;
  connectSocket(url: string): {
    send(text: string): void;
    close(): void;
    onOpen(fn: () => void): void;
    onMessage(fn: (data: string) => void): void;
    onClose(fn: () => void): void;
    onError(fn: (error: unknown) => void): void;
  };
  request(
    url: string,
    headers: Record<string, string>,
    method?: string,
    body?: unknown,
  ): Promise<{ status: number; data: any }>;
}

export interface ClientOptions {
  /** An owner token (eto_…), ideally task-scoped, or an admin key. */
  token?: string;
  /** The errands server, e.g. "https://jobs.example.com" (default: this page's origin). */
  baseUrl?: string;
  adapter?: Adapter;
}

export interface WatchOptions extends ClientOptions {
  onChange?: (change: TaskChange) => void;
  /** The task reached a final state (one-task watches). */
  onEnd?: (task: Task) => void;
  /** Transport trouble; the watch keeps trying. */
  onError?: (error: Error) => void;
  /** Called with each transport as the watch starts to use it ("sse", then "ws", then "poll"). */
  onTransport?: (transport: Transport) => void;
  /** Output, as it is made: each chunk once, in order. Implies streams: "include". */
  onStream?: (name: string, chunk: unknown, info: StreamInfo) => void;
  streams?: "none" | "include" | "only";
  /** Ask the server for changed fields only (onChange still gets the whole task). */
  compact?: boolean;
  /** Resume after this seq (0: replay the whole log); default: from the task's current state. */
  after?: number;
  /** Use only this transport. */
  transport?: Transport | "auto";
  /** Polling's first interval, in milliseconds (it backs off). */
  pollMs?: number;
}

export interface WatchHandle {
  close(): void;
  /** The chunks of stream `name` received so far (a set watch: of task `taskId`). */
  chunks(name: string, taskId?: string): unknown[];
  /** Their text (JSON chunks as JSON). */
  text(name: string, taskId?: string): string;
}

/** A POST /v1/tasks body. */
export interface SubmitBody {
  type: string;
  input?: unknown;
  id?: string;
  owner?: string;
  priority?: number;
  timeout_s?: number;
  max_attempts?: number;
  expires_in_s?: number;
  notify_url?: string;
  run_at?: string;
  delay_s?: number;
  start_within_s?: number;
  key?: string;
  debounce_key?: string;
  debounce_s?: number;
}

export type BatchResult =
  | { status: 200 | 202; task: Task }
  | { status: number; error: TaskError };

export interface SetFilter {
  type?: string;
  status?: Status;
  owner?: string;
}

export interface Balance {
  owner: string;
  balance: number;
  reserved: number;
  updated_at: string | null;
}

export interface DayUsage {
  day: string;
  owner: string;
  type: string;
  submitted: number;
  statuses: Record<Status, number>;
  credits_charged: number;
  credits_reserved: number;
}

export interface UsageFilter {
  since?: string;
  until?: string;
  type?: string;
  owner?: string;
  after?: string;
  limit?: number;
}

export interface UsagePage {
  since: string;
  until: string;
  usage: DayUsage[];
  next_after: string | null;
}

export function wxAdapter(wx: unknown): Adapter;
export function submitTask(body: SubmitBody, options?: ClientOptions): Promise<Task>;
export function submitTasks(tasks: SubmitBody[], options?: ClientOptions): Promise<BatchResult[]>;
export function watchTask(id: string, options?: WatchOptions): WatchHandle;
export function watchTasks(filter?: SetFilter, options?: WatchOptions): WatchHandle;
export function getBalance(options?: ClientOptions): Promise<Balance>;
export function getUsage(filter?: UsageFilter, options?: ClientOptions): Promise<UsagePage>;
