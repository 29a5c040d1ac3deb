// `ai`'s DefaultChatTransport and `@ai-sdk/react`'s useChat against tokenrelay's
// UI message stream endpoints: POST /ai/chat, GET /ai/chat/{id}/stream, POST /ai/chat/{id}/stop.
import "../lib/dom.js";

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { afterEach, describe, test } from "node:test";

import { useChat } from "@ai-sdk/react";
import { cleanup, render, waitFor } from "@testing-library/react";
import { DefaultChatTransport, lastAssistantMessageIsCompleteWithToolCalls, readUIMessageStream } from "ai";
import { createElement as h } from "react";

import { URL, browserTab, client, eventually, textOf, threadMessages } from "../lib/helpers.js";

const API = `${URL}/ai/chat`;
const SLOW_WORDS = 60;
const WAIT = { timeout: 15000, interval: 20 };

const newChatId = () => `chat-${randomUUID()}`;
const transport = (options = {}) =>
  new DefaultChatTransport({ api: API, body: { assistant_id: "slow" }, ...options });
const userMessage = (text) => ({
  id: `user-${randomUUID()}`,
  role: "user",
  parts: [{ type: "text", text }],
});
const uiText = (message) =>
  message.parts
    .filter((p) => p.type === "text")
    .map((p) => p.text)
    .join("");
const deltas = (chunks) =>
  chunks
    .filter((c) => c.type === "text-delta")
    .map((c) => c.delta)
    .join("");
const words = (text) => text.split(" ").filter(Boolean).length;

/** Reads UI message chunks until the stream ends or `stopWhen(chunks)` says so. */
async function readChunks(stream, stopWhen = () => false) {
  const chunks = [];
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      if (stopWhen(chunks)) break;
    }
  } finally {
    reader.releaseLock();
  }
  return chunks;
}

async function savedReply(chatId) {
  const messages = await threadMessages(chatId);
  assert.deepEqual(
    messages.map((m) => m.type),
    ["human", "ai"],
  );
  return messages[1];
}

/** The reply "slow" gives `text` on a fresh chat, streamed to the end. */
async function reference(text) {
  const chunks = await readChunks(
    await transport().sendMessages({
      chatId: newChatId(),
      messages: [userMessage(text)],
      trigger: "submit-message",
      messageId: undefined,
    }),
  );
  return deltas(chunks);
}

function ChatView({ probe, ...options }) {
  const chat = useChat(options);
  probe.current = chat;
  return h(
    "ol",
    null,
    chat.messages.map((m) => h("li", { key: m.id, "data-role": m.role }, uiText(m))),
  );
}

function mountChat(options) {
  const probe = { current: null };
  const view = render(h(ChatView, { probe, ...options }));
  return { probe, view };
}

const assistantText = (probe) => {
  const ai = probe.current.messages.filter((m) => m.role === "assistant");
  return ai.length ? uiText(ai.at(-1)) : "";
};

describe("ai DefaultChatTransport and @ai-sdk/react useChat", { timeout: 60000 }, () => {
  afterEach(() => cleanup());

  test("DefaultChatTransport: a chat turn streams the UI message protocol", async () => {
    const chatId = newChatId();
    const chunks = await readChunks(
      await transport().sendMessages({
        chatId,
        messages: [userMessage("hello there")],
        trigger: "submit-message",
        messageId: undefined,
        abortSignal: undefined,
      }),
    );
    const types = chunks.map((c) => c.type);
    assert.equal(types[0], "start");
    assert.equal(types[1], "text-start");
    assert.equal(types.at(-2), "text-end");
    assert.equal(types.at(-1), "finish");
    assert.ok(types.slice(2, -2).every((t) => t === "text-delta"));
    const text = deltas(chunks);
    assert.equal(words(text), SLOW_WORDS);
    assert.equal(textOf(await savedReply(chatId)), text);

    // The same chunks, read the way an app without React does.
    let message;
    for await (const m of readUIMessageStream({
      stream: new ReadableStream({
        start(controller) {
          for (const c of chunks) controller.enqueue(c);
          controller.close();
        },
      }),
    })) {
      message = m;
    }
    assert.equal(message.role, "assistant");
    assert.equal(uiText(message), text);

    // Nothing is active any more: reconnecting finds nothing (204).
    assert.equal(await transport().reconnectToStream({ chatId }), null);
  });

  test("DefaultChatTransport: abort mid-stream, then reconnectToStream replays the whole reply", async () => {
    const chatId = newChatId();
    const controller = new AbortController();
    const first = await transport().sendMessages({
      chatId,
      messages: [userMessage("resume this")],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: controller.signal,
    });
    const seen = await readChunks(first, (chunks) => chunks.length >= 10);
    controller.abort();
    assert.equal(seen[0].type, "start");

    const again = await transport().reconnectToStream({ chatId });
    assert.ok(again, "the run is still active, so there is a stream to resume");
    const chunks = await readChunks(again);
    assert.deepEqual(chunks[0], seen[0], "the replay starts from the same start part");
    assert.deepEqual(chunks.slice(0, seen.length), seen);
    assert.equal(chunks.at(-1).type, "finish");
    const text = deltas(chunks);
    assert.equal(words(text), SLOW_WORDS);
    assert.equal(textOf(await savedReply(chatId)), text);
  });

  test("useChat: sendMessage streams the full assistant text", async () => {
    const id = newChatId();
    const { probe, view } = mountChat({ id, transport: transport() });
    assert.equal(probe.current.status, "ready");
    await probe.current.sendMessage({ text: "hi from useChat" });
    await waitFor(() => assert.equal(probe.current.status, "ready"), WAIT);
    assert.equal(probe.current.error, undefined);
    const messages = probe.current.messages;
    assert.deepEqual(
      messages.map((m) => m.role),
      ["user", "assistant"],
    );
    const text = uiText(messages[1]);
    assert.equal(words(text), SLOW_WORDS);
    const saved = await threadMessages(id);
    assert.equal(textOf(saved[1]), text);
    assert.equal(saved[0].id, messages[0].id, "the user message keeps its id in the thread");
    assert.deepEqual(
      [...view.container.querySelectorAll("li")].map((li) => li.textContent),
      ["hi from useChat", text],
    );

    // A later mount with resume: true finds nothing active and changes nothing.
    cleanup();
    const later = mountChat({ id, transport: transport(), resume: true, messages });
    await waitFor(() => assert.equal(later.probe.current.status, "ready"), WAIT);
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.deepEqual(later.probe.current.messages, messages);
  });

  test("useChat: a graph's tool call and its result show as a dynamic tool part, left to the server", async () => {
    const toolCalls = [];
    const { probe } = mountChat({
      id: newChatId(),
      transport: transport({ body: { assistant_id: "tooluse" } }),
      // What an app with client-side tools sets: neither may act on the graph's own tools.
      onToolCall: ({ toolCall }) => toolCalls.push(toolCall),
      sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
    });
    await probe.current.sendMessage({ text: "look it up" });
    await waitFor(() => {
      assert.equal(probe.current.status, "ready");
      assert.equal(probe.current.messages.length, 2);
    }, WAIT);
    const reply = probe.current.messages[1];
    const tools = reply.parts.filter((p) => p.type === "dynamic-tool");
    assert.deepEqual(
      tools.map(({ toolName, toolCallId, state, input, output }) => ({ toolName, toolCallId, state, input, output })),
      [{ toolName: "lookup", toolCallId: "call_lookup", state: "output-available", input: { query: "streams" }, output: "found streams" }],
    );
    assert.ok(words(uiText(reply)) > 0, "the answer after the tool");
    assert.deepEqual(toolCalls, []);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(probe.current.messages.length, 2, "no automatic resend");
  });

  test("readUIMessageStream: a model's reasoning blocks become a reasoning part before the text", async () => {
    let message;
    const stream = await transport({ body: { assistant_id: "thinking" } }).sendMessages({
      chatId: newChatId(),
      messages: [userMessage("think first")],
      trigger: "submit-message",
      messageId: undefined,
    });
    for await (const m of readUIMessageStream({ stream })) message = m;
    assert.deepEqual(
      message.parts.filter((p) => p.type === "reasoning" || p.type === "text").map((p) => [p.type, p.text, p.state]),
      [["reasoning", "The user wants a word.", "done"], ["text", "Here it is", "done"]],
    );
  });

  test("useChat: a graph's custom events are data parts, kept by id or passed to onData", async () => {
    const passing = [];
    const { probe } = mountChat({
      id: newChatId(),
      transport: transport({ body: { assistant_id: "progress" } }),
      onData: (part) => passing.push(part),
    });
    await probe.current.sendMessage({ text: "report" });
    await waitFor(() => {
      assert.equal(probe.current.status, "ready");
      assert.equal(probe.current.messages.length, 2);
    }, WAIT);
    const kept = probe.current.messages[1].parts.filter((p) => p.type.startsWith("data-"));
    assert.deepEqual(kept, [
      { type: "data-progress", id: "search", data: { type: "progress", id: "search", done: 2, of: 2 } },
    ]);
    assert.deepEqual(
      passing.filter((p) => p.transient).map((p) => [p.type, p.data]),
      [["data-status", { type: "status", text: "reading" }], ["data-custom", "plain"]],
    );
    assert.ok(words(uiText(probe.current.messages[1])) > 0);
  });

  test("useChat resume: true after a dropped connection shows the reply exactly once", async () => {
    const id = newChatId();
    const tab = browserTab();
    const first = mountChat({ id, transport: transport({ fetch: tab.fetch }) });
    const sent = first.probe.current.sendMessage({ text: "drop and resume" });
    await waitFor(() => assert.ok(words(assistantText(first.probe)) >= 10), WAIT);
    const userMessages = first.probe.current.messages.filter((m) => m.role === "user");
    tab.close(); // the page goes away mid-stream; the run goes on
    await sent;
    first.view.unmount();

    // A new page for the same chat: it has the user's message (the app stored it) and
    // resumes the reply.
    const second = mountChat({
      id,
      transport: transport(),
      resume: true,
      messages: userMessages,
    });
    await waitFor(() => assert.equal(second.probe.current.status, "streaming"), WAIT);
    await waitFor(() => assert.equal(second.probe.current.status, "ready"), WAIT);
    assert.equal(second.probe.current.error, undefined);
    const messages = second.probe.current.messages;
    assert.deepEqual(
      messages.map((m) => m.role),
      ["user", "assistant"],
    );
    const text = uiText(messages[1]);
    assert.equal(words(text), SLOW_WORDS);
    assert.equal(textOf(await savedReply(id)), text);
    assert.deepEqual(
      [...second.view.container.querySelectorAll("li")].map((li) => li.textContent),
      ["drop and resume", text],
    );
  });

  test("stop keeps the partial text in the chat's thread", async () => {
    const full = reference("please stop");
    const id = newChatId();
    const { probe } = mountChat({ id, transport: transport() });
    const sent = probe.current.sendMessage({ text: "please stop" });
    await waitFor(() => assert.ok(words(assistantText(probe)) >= 10), WAIT);

    // The app's stop button: stop on the server (the run is resumable, so dropping the
    // connection alone would not), then stop reading.
    const res = await fetch(`${API}/${id}/stop`, { method: "POST" });
    assert.equal(res.status, 200);
    await sent;
    await waitFor(() => assert.equal(probe.current.status, "ready"), WAIT);
    probe.current.stop();

    const sdk = client();
    const [run] = await sdk.runs.list(id);
    await eventually(async () => (await sdk.runs.get(id, run.run_id)).status === "interrupted", {
      what: "the run to be interrupted",
    });
    const saved = await savedReply(id);
    const partial = textOf(saved);
    const fullText = await full;
    assert.equal(words(fullText), SLOW_WORDS);
    assert.ok(partial.length > 0);
    assert.ok(partial.length < fullText.length, "stopped before the end");
    assert.ok(fullText.startsWith(partial), `"${partial}" is a prefix of the full reply`);
    assert.equal(saved.response_metadata?.finish_reason, "cancelled");
    assert.equal(assistantText(probe), partial, "the chat shows what the thread kept");

    // Nothing active any more.
    assert.equal((await fetch(`${API}/${id}/stream`)).status, 204);
  });

  test("stop via the transport-level stream: it ends with an abort part", async () => {
    const chatId = newChatId();
    const stream = await transport().sendMessages({
      chatId,
      messages: [userMessage("abort part")],
      trigger: "submit-message",
      messageId: undefined,
    });
    let stopped;
    const chunks = await readChunks(stream, (c) => {
      if (!stopped && c.length >= 10) {
        stopped = fetch(`${API}/${chatId}/stop`, { method: "POST" }).then((r) => r.json());
      }
      return false;
    });
    const body = await stopped;
    assert.ok(body.stopped, "stop names the run it stopped");
    assert.equal(chunks.at(-1).type, "abort");
    assert.equal(chunks.at(-2).type, "text-end");
    assert.equal(textOf(await savedReply(chatId)), deltas(chunks));
  });
});
