// nanochat web UI: plain JS, no build step. It talks to the same OpenAI-compatible API as every
// other client (POST v1/chat/completions with stream: true) and reads the SSE stream with fetch.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const API = "v1/chat/completions";
  // tool calls arrive inside the text between the tokenizer's markers; an unclosed one is still streaming
  const TOOL = /<\|python_start\|>([\s\S]*?)(<\|python_end\|>|$)|<\|output_start\|>([\s\S]*?)(<\|output_end\|>|$)/g;

  const state = {
    messages: [],          // [{role: "user" | "assistant", content: string}], sent as the history
    streaming: false,
    editing: null,         // index of the user message being edited
    error: null,           // {message, retry}
    controller: null,      // AbortController of the running request
    apiKey: localStorage.getItem("nanochat-api-key") || "",
  };

  // ---------------------------------------------------------------- rendering

  function renderContent(el, text) {
    el.replaceChildren();
    let pos = 0;
    for (const m of text.matchAll(TOOL)) {
      if (m.index > pos) el.append(text.slice(pos, m.index));
      const span = document.createElement("span");
      if (m[1] !== undefined) {
        span.className = "tool-call" + (m[2] ? "" : " pending");
        span.textContent = m[1];
      } else {
        span.className = "tool-output";
        span.textContent = m[3];
      }
      el.append(span);
      pos = m.index + m[0].length;
    }
    if (pos < text.length) el.append(text.slice(pos));
  }

  function button(label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", (e) => { e.stopPropagation(); onClick(); });
    return b;
  }

  function messageEl(msg, i) {
    const div = document.createElement("div");
    div.className = `message ${msg.role}`;
    div.dataset.index = i;
    const last = i === state.messages.length - 1;
    if (msg.role === "user" && state.editing === i) {
      const area = document.createElement("textarea");
      area.value = msg.content;
      area.rows = Math.max(2, msg.content.split("\n").length);
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(button("Send", () => submitEdit(i, area.value)), button("Cancel", () => { state.editing = null; render(); }));
      div.append(area, actions);
      setTimeout(() => area.focus(), 0);
      return div;
    }
    const content = document.createElement("div");
    content.className = "content";
    renderContent(content, msg.content);
    div.append(content);
    if (msg.role === "user") {
      div.title = "click to edit";
      div.addEventListener("click", () => { if (!state.streaming) { state.editing = i; render(); } });
    } else if (last && state.streaming) {
      div.classList.add("streaming");
    } else if (last) {
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(button("Regenerate", regenerate));
      div.append(actions);
    }
    return div;
  }

  function render() {
    const chat = $("chat");
    chat.replaceChildren();
    if (!state.messages.length && !state.error) {
      const p = document.createElement("p");
      p.id = "empty";
      p.className = "hint";
      p.textContent = "Ask anything. Enter sends, Shift+Enter adds a line. Click a message of yours to edit it.";
      chat.append(p);
    }
    state.messages.forEach((m, i) => chat.append(messageEl(m, i)));
    if (state.error) {
      const div = document.createElement("div");
      div.className = "message error";
      div.textContent = state.error.message;
      if (state.error.retry) {
        const actions = document.createElement("div");
        actions.className = "actions";
        actions.append(button("Retry", () => { state.error = null; generate(); }));
        div.append(actions);
      }
      chat.append(div);
    }
    $("send").hidden = state.streaming;
    $("stop").hidden = !state.streaming;
    chat.scrollTop = chat.scrollHeight;
  }

  function lastContentEl() {
    return $("chat").querySelector(`.message[data-index="${state.messages.length - 1}"] .content`);
  }

  // ---------------------------------------------------------------- talking to the API

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
    return h;
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function* sseData(body) {
    // yields the payload of every `data:` line of a server-sent event stream
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6);
        }
      }
    }
  }

  async function generate() {
    const history = state.messages.map(({ role, content }) => ({ role, content }));
    const reply = { role: "assistant", content: "" };
    state.messages.push(reply);
    state.streaming = true;
    state.error = null;
    state.controller = new AbortController();
    render();
    const el = lastContentEl();
    try {
      const res = await fetch(API, {
        method: "POST",
        headers: headers(),
        signal: state.controller.signal,
        body: JSON.stringify({
          model: "nanochat", messages: history, stream: true,
          temperature: Number($("temperature").value), top_k: Number($("top-k").value),
        }),
      });
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        throw new ApiError(res.status, body?.error?.message || `${res.status} ${res.statusText}`);
      }
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.index === 0 && choice.delta?.content) {
            reply.content += choice.delta.content;
            renderContent(el, reply.content);
            $("chat").scrollTop = $("chat").scrollHeight;
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") {
        if (!reply.content) state.messages.pop();  // nothing came: the user turn can be retried
        state.error = { message: e.message, retry: !reply.content };
        if (e.status === 401) showAuth();
      }
    } finally {
      state.streaming = false;
      state.controller = null;
      render();
    }
  }

  function send(text) {
    if (state.streaming || !text.trim()) return;
    if (state.error && state.messages.length && state.messages.at(-1).role === "user") state.messages.pop();
    state.messages.push({ role: "user", content: text });
    generate();
  }

  function submitEdit(i, text) {
    if (!text.trim()) return;
    state.messages = state.messages.slice(0, i);
    state.editing = null;
    send(text);
  }

  function regenerate() {
    if (state.streaming || state.messages.at(-1)?.role !== "assistant") return;
    state.messages.pop();
    generate();
  }

  function newChat() {
    state.controller?.abort();
    state.messages = [];
    state.editing = null;
    state.error = null;
    render();
    $("input").focus();
  }

  function showAuth() {
    $("auth").hidden = false;
    $("api-key").focus();
  }

  async function loadModel() {
    const badge = $("model");
    try {
      const res = await fetch("v1/models", { headers: headers() });
      if (res.status === 401) { badge.textContent = "needs an API key"; showAuth(); return; }
      if (!res.ok) { badge.textContent = "loading model…"; setTimeout(loadModel, 2000); return; }
      const model = (await res.json()).data[0];
      badge.textContent = `${model.id} · ${model.checkpoint}`;
      badge.classList.add("ready");
    } catch (e) {
      badge.textContent = "server unreachable";
      setTimeout(loadModel, 5000);
    }
  }

  // ---------------------------------------------------------------- wiring

  for (const id of ["temperature", "top-k"]) {
    const input = $(id);
    const saved = localStorage.getItem(`nanochat-${id}`);
    if (saved !== null) input.value = saved;
    const show = () => { $(`${id}-value`).textContent = input.value; localStorage.setItem(`nanochat-${id}`, input.value); };
    input.addEventListener("input", show);
    show();
  }
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (state.streaming || !text.trim()) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("save-key").addEventListener("click", () => {
    state.apiKey = $("api-key").value.trim();
    localStorage.setItem("nanochat-api-key", state.apiKey);
    $("auth").hidden = true;
    loadModel();
  });

  window.nanochat = { state, render };  // for tests and the curious
  render();
  loadModel();
})();
