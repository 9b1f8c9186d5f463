// pages/extract/extract.js: submit a video link, watch the extraction live, show the text.
// lib/errands.js is errands' client: copy it from https://<your errands>/client/errands.js.
// getApp().globalData holds { baseUrl, token }: the token is an owner token for the user's
// openid, which your login endpoint mints (POST /v1/tokens) after wx.login.
import { submitTask, watchTask, wxAdapter } from "../../lib/errands.js";

const TEMPLATE_ID = "YOUR_TEMPLATE_ID"; // the subscribe message app.py sends when a task ends

Page({
  data: { videoUrl: "", taskId: "", status: "", progress: 0, message: "", result: null, error: "" },

  onLoad(query) {
    if (query.taskId) this.watch(query.taskId); // opened from the subscribe message
  },

  onUnload() {
    if (this.handle) this.handle.close();
  },

  onInput(e) {
    this.setData({ videoUrl: e.detail.value });
  },

  async submit() {
    // The user allows the one message this task will send (asked from a tap, or WeChat refuses).
    await wx.requestSubscribeMessage({ tmplIds: [TEMPLATE_ID] }).catch(() => {});
    const { baseUrl, token } = getApp().globalData;
    // The page chooses the task's id, so sending it again after a network error cannot make a
    // second task: errands answers the same request with the task it already has.
    const id = `ext-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    const body = { type: "extract_text", id, input: { video_url: this.data.videoUrl } };
    this.setData({ taskId: id, status: "pending", progress: 0, message: "", result: null, error: "" });
    for (let tries = 1; ; tries++) {
      try {
        await submitTask(body, { baseUrl, token, adapter: wxAdapter(wx) });
        break;
      } catch (err) {
        if (err.status || tries === 3) return this.setData({ status: "", error: err.message });
      }
    }
    this.watch(id);
  },

  watch(taskId) {
    const { baseUrl, token } = getApp().globalData;
    if (this.handle) this.handle.close();
    this.setData({ taskId });
    // A WebSocket through wx.connectSocket (polling with wx.request if it cannot connect); the
    // first event is the task as it is now, so nothing before the watch is missed.
    const handle = watchTask(taskId, {
      baseUrl, token, adapter: wxAdapter(wx),
      onChange: ({ task }) => this.setData({ status: task.status, progress: task.progress, message: task.message || "" }),
      onEnd: (task) => {
        handle.close(); // the task has ended: nothing more will come
        this.setData({ result: task.result, error: task.error ? task.error.message : "" });
      },
    });
    this.handle = handle;
  },
});
