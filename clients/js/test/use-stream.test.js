// React's `useStream` (@langchain/langgraph-sdk/react) under jsdom, against tokenrelay.
import "../lib/dom.js";

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import { useStream } from "@langchain/langgraph-sdk/react";
import { cleanup, render, waitFor } from "@testing-library/react";
import { createElement as h } from "react";

import { browserTab, client, eventually, say, textOf, threadMessages } from "../lib/helpers.js";

const SLOW_WORDS = 60;
const WAIT = { timeout: 15000, interval: 20 };

/** A chat view over `useStream`; the hook's latest result is kept in `probe.current`. */
function Chat({ probe, ...options }) {
  const stream = useStream({ apiUrl: "unused", messagesKey: "messages", ...options });
  probe.current = stream;
  return h(
    "ol",
    null,
    stream.messages.map((m, i) => h("li", { key: m.id ?? i, "data-type": m.type }, textOf(m))),
  );
}

function mount(options) {
  const probe = { current: null };
  const tab = browserTab();
  const view = render(h(Chat, { probe, client: tab.client(), ...options }));
  return { probe, tab, view };
}

const summary = (messages) => messages.map((m) => [m.type, textOf(m)]);
const aiText = (probe) => {
  const ai = probe.current.messages.find((m) => m.type === "ai");
  return ai ? textOf(ai) : "";
};
const wordsStreamed = (probe) => aiText(probe).split(" ").filter(Boolean).length;

/** Runs `text` through "slow" on a fresh thread to the end: the reference reply. */
async function uninterrupted(text) {
  const { probe, view } = mount({ assistantId: "slow" });
  await probe.current.submit(say(text));
  await waitFor(() => {
    assert.equal(probe.current.isLoading, false);
    assert.equal(probe.current.messages.length, 2);
  }, WAIT);
  const messages = summary(probe.current.messages);
  view.unmount();
  assert.equal(messages[1][1].split(" ").length, SLOW_WORDS);
  return messages;
}

describe("useStream", { timeout: 60000 }, () => {
  afterEach(() => {
    cleanup();
    window.sessionStorage.clear();
  });

  test("unmount mid-run and remount the thread: reconnectOnMount resumes to the same result", async () => {
    const reference = uninterrupted("reload the page");

    let threadId;
    const first = mount({
      assistantId: "slow",
      reconnectOnMount: true,
      onThreadId: (id) => {
        threadId = id;
      },
    });
    const submitted = first.probe.current.submit(say("reload the page"), { streamResumable: true });
    await waitFor(() => assert.ok(wordsStreamed(first.probe) >= 10), WAIT);
    // The page goes away mid-run: its connections drop and the component unmounts.
    first.tab.close();
    first.view.unmount();
    await submitted;
    const runId = window.sessionStorage.getItem(`lg:stream:${threadId}`);
    assert.ok(runId, "useStream kept the run id for a later mount");
    assert.notEqual((await client().runs.get(threadId, runId)).status, "success");

    const second = mount({ assistantId: "slow", reconnectOnMount: true, threadId });
    await waitFor(() => assert.equal(second.probe.current.isLoading, true), WAIT);
    await waitFor(() => {
      assert.equal(second.probe.current.isLoading, false);
      assert.equal(wordsStreamed(second.probe), SLOW_WORDS);
    }, WAIT);
    assert.deepEqual(summary(second.probe.current.messages), await reference);
    assert.deepEqual(summary(await threadMessages(threadId)), await reference);
    assert.equal(window.sessionStorage.getItem(`lg:stream:${threadId}`), null);
    // The rendered list shows each message once.
    const items = [...second.view.container.querySelectorAll("li")];
    assert.deepEqual(
      items.map((li) => [li.dataset.type, li.textContent]),
      await reference,
    );
  });

  test("stop() cancels the run and the partial reply stays in the thread", async () => {
    const reference = uninterrupted("stop right there");

    let threadId;
    let runId;
    const { probe } = mount({
      assistantId: "slow",
      // Without a run-id store (`reconnectOnMount`), stop() only aborts the request.
      reconnectOnMount: true,
      onThreadId: (id) => {
        threadId = id;
      },
      onCreated: (meta) => {
        runId = meta.run_id;
      },
    });
    const submitted = probe.current.submit(say("stop right there"));
    await waitFor(() => assert.ok(wordsStreamed(probe) >= 10), WAIT);
    probe.current.stop();
    await submitted;
    await waitFor(() => assert.equal(probe.current.isLoading, false), WAIT);

    const sdk = client();
    await eventually(async () => (await sdk.runs.get(threadId, runId)).status === "interrupted", {
      what: "the run to be interrupted",
    });
    const messages = await threadMessages(threadId);
    assert.deepEqual(
      messages.map((m) => m.type),
      ["human", "ai"],
    );
    const partial = textOf(messages[1]);
    const full = (await reference)[1][1];
    assert.ok(partial.length > 0);
    assert.ok(partial.length < full.length, "stopped before the end");
    assert.ok(full.startsWith(partial), `"${partial}" is a prefix of the full reply`);
    assert.ok(partial.startsWith(aiText(probe)), "what the UI showed is kept");
    assert.equal(messages[1].response_metadata?.finish_reason, "cancelled");
  });

  test("stop() with the default options (no reconnectOnMount)", async () => {
    // Not resumable by default, so the run is created with on_disconnect=cancel and
    // stop()'s abort is what stops it on the server.
    let threadId;
    let runId;
    const { probe } = mount({
      assistantId: "slow",
      onThreadId: (id) => {
        threadId = id;
      },
      onCreated: (meta) => {
        runId = meta.run_id;
      },
    });
    const submitted = probe.current.submit(say("stop by disconnecting"));
    await waitFor(() => assert.ok(wordsStreamed(probe) >= 10), WAIT);
    probe.current.stop();
    await submitted;
    const sdk = client();
    const status = await eventually(
      async () => {
        const { status } = await sdk.runs.get(threadId, runId);
        return status !== "running" && status !== "pending" && status;
      },
      { what: "the run to end" },
    );
    assert.equal(status, "interrupted");
    const messages = await threadMessages(threadId);
    assert.deepEqual(
      messages.map((m) => m.type),
      ["human", "ai"],
    );
    assert.ok(textOf(messages[1]).startsWith(aiText(probe)));
  });

  test("submit with multitaskStrategy interrupt while another run is active", async () => {
    let threadId;
    let firstRun;
    const first = mount({
      assistantId: "slow",
      onThreadId: (id) => {
        threadId = id;
      },
      onCreated: (meta) => {
        firstRun = meta.run_id;
      },
    });
    const firstDone = first.probe.current.submit(say("first question"), {
      streamResumable: true,
    });
    await waitFor(() => assert.ok(wordsStreamed(first.probe) >= 5), WAIT);

    // Another view of the same thread (another tab) asks something else, interrupting.
    let secondRun;
    const second = mount({
      assistantId: "slow",
      threadId,
      onCreated: (meta) => {
        secondRun = meta.run_id;
      },
    });
    await waitFor(() => assert.equal(second.probe.current.messages.length, 1), WAIT);
    await second.probe.current.submit(say("second question"), {
      multitaskStrategy: "interrupt",
      streamResumable: true,
    });
    await firstDone;
    await waitFor(() => {
      assert.equal(first.probe.current.isLoading, false);
      assert.equal(second.probe.current.isLoading, false);
    }, WAIT);

    const sdk = client();
    assert.equal((await sdk.runs.get(threadId, firstRun)).status, "interrupted");
    assert.equal((await sdk.runs.get(threadId, secondRun)).status, "success");
    const shown = second.probe.current.messages;
    assert.deepEqual(textOf(shown[0]), "first question");
    assert.deepEqual(
      shown.slice(-2).map((m) => [m.type, m.type === "human" ? textOf(m) : undefined]),
      [
        ["human", "second question"],
        ["ai", undefined],
      ],
    );
    assert.equal(textOf(shown.at(-1)).split(" ").length, SLOW_WORDS);
    assert.deepEqual(summary(await threadMessages(threadId)), summary(shown));
  });
});
