// Compiled by tsc (tests/unit/test_js_types.py): the declarations of errands.js describe how the
// README and docs use it, and refuse what it does not take.
import {
  getBalance, getUsage, submitTask, submitTasks, watchTask, watchTasks, wxAdapter, type Task, type Transport,
} from "../../src/errands/static/errands.js";

const token = "eto_example";
const handle = watchTask("order-42", {
  token,
  baseUrl: "https://jobs.example.com",
  after: 0,
  onChange: ({ type, seq, task }) => console.log(type, seq, task.status, task.progress),
  onEnd: (task: Task) => console.log(task.result),
  onError: (error: Error) => console.warn(error.message),
  onTransport: (transport: Transport) => console.log(transport),
  onStream: (name, chunk, info) => console.log(name, chunk, info.attempt, info.restarted),
});
const text: string = handle.text("text");
handle.close();

watchTasks({ type: "photography", status: "processing" }, { token, adapter: wxAdapter({}), compact: true }).close();

async function submit(): Promise<void> {
  const task = await submitTask({ type: "photography", input: { prompt: "a cat" }, delay_s: 5 }, { token });
  const results = await submitTasks([{ type: "photography" }, { type: "echo", id: "e-1" }], { token });
  for (const result of results) {
    if ("task" in result) console.log(result.task.id);
    else console.log(result.error.code);
  }
  console.log(task.scheduled_for, text);
}
submit();

async function books(): Promise<void> {
  const { balance, reserved } = await getBalance({ token });
  const page = await getUsage({ since: "2026-12-01", type: "photography" }, { token });
  for (const day of page.usage) console.log(day.day, day.statuses.completed, day.credits_charged);
  console.log(balance - reserved, page.next_after);
}
books();

// @ts-expect-error: a watch takes a task id, not a number
watchTask(42, { token });
// @ts-expect-error: no such transport
watchTask("x", { transport: "carrier-pigeon" });
// @ts-expect-error: a submission needs its type
submitTask({ input: {} });
// @ts-expect-error: usage is filtered by day, type and owner only
getUsage({ status: "failed" });
