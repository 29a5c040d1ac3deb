// `useStream` from @langchain/react 1.x (the thread-centric agent streaming protocol:
// POST /threads/{tid}/commands, POST /threads/{tid}/stream/events SSE, WebSocket on the same
// path) under jsdom, against the server at TOKENRELAY_URL, once per built-in transport.
//
// Graphs (assistant ids) the server must register: "agent" (tokenrelay.producer.demo:graph, any reply
// length >= 4 words with a token delay that leaves time to act mid-run), "interrupt" (asks
// interrupt({"question": "approve?"}) then answers with the fast model) and "nested" (a
// subgraph node "inner" that streams the reply): see clients/js/PROTOCOL-NOTES.md.
//
// Every assertion is on content (what the hook shows, what the thread state holds), never on
// timings. Against the official server (langgraph-api 0.16.7) two cases fail per transport, by
// its defects: stop() loses the partial reply, and on a fresh subscription it replays the earlier
// runs' events, so submit() on a hydrated thread settles on the previous run's "completed".
import { window } from "../lib/dom.js";

import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";

import { useMessages, useStream } from "@langchain/react";
import { cleanup, renderHook, waitFor } from "@testing-library/react";

import { startCutProxy } from "../lib/cut-proxy.js";
import { URL as SERVER, client, eventually, textOf } from "../lib/helpers.js";

// Node 20 has no global WebSocket: use the DOM's (jsdom's), as a browser page would.
if (typeof globalThis.WebSocket !== "function") {
  Object.defineProperty(globalThis, "WebSocket", {
    value: window.WebSocket,
    configurable: true,
    writable: true,
  });
}

const WAIT = { timeout: 30000, interval: 20 };
const TRANSPORTS = ["sse", "websocket"];

const say = (text) => ({ messages: [{ type: "human", content: text }] });
const typeOf = (m) => m.type ?? m._getType?.() ?? m.getType?.();
/** [type, text, id] per message: what must match between the hook and the thread state. */
const summary = (messages) => messages.map((m) => [typeOf(m), textOf(m), m.id]);
const aiText = (messages) => {
  const ai = messages.findLast((m) => typeOf(m) === "ai");
  return ai ? textOf(ai) : "";
};
const words = (text) => text.split(" ").filter(Boolean).length;

async function threadState(threadId) {
  return await client().threads.getState(threadId);
}

/**
 * Renders `useStream` (and `useMessages` on the first discovered subgraph when `subgraph` is
 * set) and records every render, so tests can check every intermediate text.
 */
function mountStream(transport, options = {}, { subgraph = false, apiUrl = SERVER } = {}) {
  const renders = [];
  const view = renderHook(
    (props) => {
      const stream = useStream(props);
      const sub = subgraph ? ([...stream.subgraphs.values()][0] ?? null) : null;
      const scoped = useMessages(stream, sub);
      renders.push({
        isLoading: stream.isLoading,
        messages: stream.messages,
        sub,
        scoped: sub ? scoped : null,
      });
      return { stream, sub, scoped };
    },
    { initialProps: { apiUrl, assistantId: "agent", transport, ...options } },
  );
  return {
    view,
    renders,
    get stream() {
      return view.result.current.stream;
    },
    get current() {
      return view.result.current;
    },
  };
}

/** Every text the hook ever showed for the last AI message is a prefix of `final`. */
function assertOnlyPrefixes(renders, final, pick = (r) => r.messages) {
  for (const r of renders) {
    const messages = pick(r);
    if (!messages) continue;
    const shown = aiText(messages);
    assert.ok(
      final.startsWith(shown),
      `the hook showed ${JSON.stringify(shown)}, not a prefix of the final reply ${JSON.stringify(final)} (duplicated or reordered token)`,
    );
  }
}

/** The hook converges to the thread state (messages, ids and texts). */
async function assertConverges(h, expected) {
  await waitFor(() => assert.deepEqual(summary(h.stream.messages), expected), WAIT);
}

async function waitForIdle(h, threadId, expectedMessages) {
  await waitFor(() => {
    assert.equal(h.stream.isLoading, false);
    assert.equal(h.stream.messages.length, expectedMessages);
  }, WAIT);
  await eventually(async () => (await client().threads.get(threadId)).status === "idle", {
    what: "the thread to be idle",
    timeout: WAIT.timeout,
  });
}

for (const transport of TRANSPORTS) {
  describe(`@langchain/react useStream v1 (transport: "${transport}")`, { timeout: 240000 }, () => {
    afterEach(() => {
      cleanup();
      window.sessionStorage.clear();
    });

    test("submit on a new thread: the reply streams and ends equal to the thread state", async () => {
      let threadId;
      let created;
      const h = mountStream(transport, {
        onThreadId: (id) => {
          threadId = id;
        },
        onCreated: (meta) => {
          created = meta;
        },
      });
      await h.stream.submit(say("hello from a new thread"));
      await waitForIdle(h, threadId, 2);

      assert.ok(threadId, "onThreadId gave the new thread's id");
      assert.equal(h.stream.threadId, threadId);
      assert.ok(created?.runId, "onCreated gave the run id from run.start");
      assert.equal(h.stream.error, undefined);

      const state = await threadState(threadId);
      const expected = summary(state.values.messages);
      assert.deepEqual(
        expected.map(([type]) => type),
        ["human", "ai"],
      );
      assert.equal(expected[0][1], "hello from a new thread");
      assert.ok(words(expected[1][1]) >= 1, "the reply has words");
      await assertConverges(h, expected);
      assert.deepEqual(state.next, []);
      // It streamed: some render showed a strict, non-empty prefix of the reply, and none
      // showed anything that is not a prefix of it.
      const final = expected[1][1];
      assert.ok(
        h.renders.some((r) => {
          const t = aiText(r.messages);
          return t.length > 0 && t.length < final.length;
        }),
        "the reply arrived token by token",
      );
      assertOnlyPrefixes(h.renders, final);
    });

    test("reload mid-run: a new hook with the same threadId re-attaches and ends with the whole reply, once", async () => {
      let threadId;
      const first = mountStream(transport, {
        onThreadId: (id) => {
          threadId = id;
        },
      });
      first.stream.submit(say("reload the page mid-run")).catch(() => {});
      await waitFor(() => assert.ok(words(aiText(first.stream.messages)) >= 2), WAIT);
      const shownBefore = aiText(first.stream.messages);
      // The page goes away: the component unmounts, its connections close.
      first.view.unmount();
      const stillRunning = (await client().threads.get(threadId)).status;
      assert.equal(stillRunning, "busy", "the run goes on server-side after the unmount");

      const second = mountStream(transport, { threadId });
      await waitFor(() => assert.equal(second.stream.isLoading, true), WAIT);
      await waitForIdle(second, threadId, 2);

      const state = await threadState(threadId);
      const expected = summary(state.values.messages);
      assert.deepEqual(
        expected.map(([type]) => type),
        ["human", "ai"],
      );
      await assertConverges(second, expected);
      const final = expected[1][1];
      assert.ok(final.startsWith(shownBefore), "the first page showed a prefix of the reply");
      assert.ok(final.length > shownBefore.length, "the reply went on after the reload");
      assertOnlyPrefixes(second.renders, final);
      // The second page did re-attach to the live run (not just read the state at the end).
      assert.ok(
        second.renders.some((r) => r.isLoading && aiText(r.messages).length < final.length),
        "the second hook showed the run in progress",
      );
    });

    test("stop() mid-run cancels the run and keeps the partial reply in the thread state", async () => {
      const text = "stop right there";
      // The same conversation always gets the same reply: run it once to the end elsewhere.
      const reference = (async () => {
        let tid;
        const ref = mountStream(transport, {
          onThreadId: (id) => {
            tid = id;
          },
        });
        await ref.stream.submit(say(text));
        await waitForIdle(ref, tid, 2);
        const full = aiText((await threadState(tid)).values.messages);
        ref.view.unmount();
        return full;
      })();

      let threadId;
      let runId;
      const h = mountStream(transport, {
        onThreadId: (id) => {
          threadId = id;
        },
        onCreated: (meta) => {
          runId = meta.runId;
        },
      });
      const submitted = h.stream.submit(say(text)).catch(() => {});
      await waitFor(() => assert.ok(words(aiText(h.stream.messages)) >= 2), WAIT);
      await h.stream.stop();
      const shown = aiText(h.stream.messages);
      await submitted;
      await waitFor(() => assert.equal(h.stream.isLoading, false), WAIT);
      assert.ok(runId, "onCreated gave the run id that stop() cancels");

      const status = await eventually(
        async () => {
          const run = await client().runs.get(threadId, runId);
          return run.status !== "pending" && run.status !== "running" && run.status;
        },
        { what: "the stopped run to end", timeout: WAIT.timeout },
      );
      assert.equal(status, "interrupted");

      const full = await reference;
      const messages = (await threadState(threadId)).values.messages;
      assert.deepEqual(
        messages.map(typeOf),
        ["human", "ai"],
        "the thread keeps the partial AI message (the official server drops it)",
      );
      const partial = textOf(messages[1]);
      assert.ok(partial.startsWith(shown), `what the UI showed (${JSON.stringify(shown)}) is kept`);
      assert.ok(partial.length < full.length, "stopped before the end");
      assert.ok(full.startsWith(partial), "the partial is a prefix of the whole reply");
    });

    test('an interrupt ("interrupt" graph) answered with respond() resumes to the end', async () => {
      let threadId;
      const h = mountStream(transport, {
        assistantId: "interrupt",
        onThreadId: (id) => {
          threadId = id;
        },
      });
      await h.stream.submit(say("may I?"));
      await waitFor(() => assert.equal(h.stream.interrupts.length, 1), WAIT);
      assert.equal(h.stream.isLoading, false);
      const [interrupt] = h.stream.interrupts;
      assert.deepEqual(interrupt.value, { question: "approve?" });
      assert.ok(interrupt.id, "the interrupt has an id");
      assert.equal(h.stream.interrupt, interrupt);

      const paused = await threadState(threadId);
      assert.deepEqual(paused.next, ["ask"]);
      assert.equal(paused.tasks[0].interrupts[0].id, interrupt.id);
      await assertConverges(h, summary(paused.values.messages));

      await h.stream.respond("yes");
      await waitForIdle(h, threadId, 3);

      const state = await threadState(threadId);
      const expected = summary(state.values.messages);
      assert.deepEqual(
        expected.map(([type, t]) => (type === "ai" ? type : [type, t])),
        [["human", "may I?"], ["human", "answer: yes"], "ai"],
      );
      assert.deepEqual(state.next, []);
      await assertConverges(h, expected);
      assert.deepEqual(h.stream.interrupts, []);
      assertOnlyPrefixes(h.renders, expected[2][1]);
    });

    test('a subgraph\'s messages ("nested" graph) stream under its namespace', async () => {
      let threadId;
      const h = mountStream(
        transport,
        {
          assistantId: "nested",
          onThreadId: (id) => {
            threadId = id;
          },
        },
        { subgraph: true },
      );
      await h.stream.submit(say("ask the inner graph"));
      await waitForIdle(h, threadId, 2);
      await waitFor(() => assert.equal(h.current.sub?.status, "complete"), WAIT);

      const sub = h.current.sub;
      assert.equal(sub.nodeName, "inner");
      assert.equal(sub.namespace.length, 1);
      assert.match(sub.namespace[0], /^inner(:|$)/);

      const state = await threadState(threadId);
      const expected = summary(state.values.messages);
      assert.deepEqual(
        expected.map(([type]) => type),
        ["human", "ai"],
      );
      await assertConverges(h, expected);
      // The scoped view ends with the same AI message (id and text) as the thread state...
      await waitFor(() => assert.equal(aiText(h.current.scoped), expected[1][1]), WAIT);
      const scopedAi = h.current.scoped.findLast((m) => typeOf(m) === "ai");
      assert.equal(scopedAi.id, expected[1][2]);
      // ...and got there token by token, under the subgraph's namespace.
      const final = expected[1][1];
      assertOnlyPrefixes(h.renders, final, (r) => r.scoped);
      assert.ok(
        h.renders.some((r) => {
          const t = r.scoped ? aiText(r.scoped) : "";
          return t.length > 0 && t.length < final.length;
        }),
        "the subgraph's reply streamed token by token in the scoped view",
      );
    });

    test("mount on an existing idle thread, then submit: hydrated, and submit() settles with this run", async () => {
      // A first run, to the end, by another hook.
      let threadId;
      const first = mountStream(transport, {
        onThreadId: (id) => {
          threadId = id;
        },
      });
      await first.stream.submit(say("first turn"));
      await waitForIdle(first, threadId, 2);
      first.view.unmount();

      let runId;
      const h = mountStream(transport, {
        threadId,
        onCreated: (meta) => {
          runId = meta.runId;
        },
      });
      const before = summary((await threadState(threadId)).values.messages);
      await assertConverges(h, before);
      assert.equal(h.stream.isLoading, false);

      const hydratedAt = h.renders.length;
      await h.stream.submit(say("second turn"));
      // submit() settles on this run's terminal event, not on a replayed one of the first run.
      const { status } = await client().runs.get(threadId, runId);
      assert.equal(
        status,
        "success",
        `submit() settled while its run was ${status}: the hook showed ` +
          `${h.stream.messages.length} messages, isLoading=${h.stream.isLoading}`,
      );
      await waitForIdle(h, threadId, 4);
      const expected = summary((await threadState(threadId)).values.messages);
      assert.deepEqual(expected.slice(0, 2), before);
      assert.deepEqual(
        expected.map(([type, t]) => (type === "human" ? t : type)),
        ["first turn", "ai", "second turn", "ai"],
      );
      await assertConverges(h, expected);
      assertOnlyPrefixes(h.renders.slice(hydratedAt), expected[3][1], (r) => r.messages.slice(2));
      // The first turn stays on screen the whole time (no replay of the first run rewrites it).
      for (const r of h.renders.slice(hydratedAt)) {
        assert.deepEqual(summary(r.messages.slice(0, 2)), before, "the first turn stayed on screen");
      }
    });

    describe("behind a proxy that cuts the event stream mid-body once", () => {
      let proxy;
      before(async () => {
        proxy = await startCutProxy({ target: SERVER, cutAfterBytes: 2500 });
      });
      after(async () => {
        await proxy?.close();
      });

      test("the hook reconnects and ends with the whole reply: no duplicate, no missing token", async () => {
        proxy.arm();
        const cutsBefore = proxy.stats.cuts;
        let threadId;
        const h = mountStream(
          transport,
          {
            onThreadId: (id) => {
              threadId = id;
            },
          },
          { apiUrl: proxy.url },
        );
        await h.stream.submit(say("through a flaky proxy"));
        await waitForIdle(h, threadId, 2);

        assert.equal(
          proxy.stats.cuts,
          cutsBefore + 1,
          `the proxy cut one stream mid-body (requests: ${proxy.stats.requests.join(", ")})`,
        );
        assert.equal(h.stream.error, undefined);
        const state = await threadState(threadId);
        const expected = summary(state.values.messages);
        assert.deepEqual(
          expected.map(([type]) => type),
          ["human", "ai"],
        );
        await assertConverges(h, expected);
        assertOnlyPrefixes(h.renders, expected[1][1]);
        // The rendered reply has each word once and in order: same words as the state.
        assert.deepEqual(aiText(h.stream.messages).split(" "), expected[1][1].split(" "));
      });
    });
  });
}
