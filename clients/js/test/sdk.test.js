// The JS client, `Client` from @langchain/langgraph-sdk, pointed at tokenrelay unchanged.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { client, eventually, say, textOf } from "../lib/helpers.js";

const FAST_WORDS = 40;
const SLOW_WORDS = 60;

const words = (text) => text.split(" ").length;

async function collect(stream) {
  const parts = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

const messageText = (parts) =>
  parts
    .filter((p) => p.event === "messages")
    .map((p) => textOf(p.data[0]))
    .join("");

describe("@langchain/langgraph-sdk Client", { timeout: 60000 }, () => {
  test("threads, a resumable stream, state, history, wait, create + join", async () => {
    const sdk = client();
    const thread = await sdk.threads.create({ metadata: { owner: "js-sdk" } });
    const tid = thread.thread_id;
    assert.equal(thread.status, "idle");

    let created;
    const parts = await collect(
      sdk.runs.stream(tid, "fast", {
        input: say("hi"),
        streamMode: ["values", "messages-tuple", "updates"],
        streamResumable: true,
        onDisconnect: "continue",
        onRunCreated: (meta) => {
          created = meta;
        },
      }),
    );
    assert.equal(parts[0].event, "metadata");
    assert.deepEqual(created, { run_id: parts[0].data.run_id, thread_id: tid });
    assert.ok(parts.every((p) => p.id), "every event carries an id");
    const events = new Set(parts.map((p) => p.event));
    for (const e of ["metadata", "values", "messages", "updates"]) assert.ok(events.has(e), e);

    const text = messageText(parts);
    assert.equal(words(text), FAST_WORDS);
    const finalValues = parts.filter((p) => p.event === "values").at(-1).data;
    assert.deepEqual(
      finalValues.messages.map((m) => m.type),
      ["human", "ai"],
    );
    assert.equal(textOf(finalValues.messages[1]), text);

    const state = await sdk.threads.getState(tid);
    assert.deepEqual(
      state.values.messages.map((m) => m.type),
      ["human", "ai"],
    );
    assert.equal(textOf(state.values.messages[1]), text);
    assert.deepEqual(state.next, []);

    const history = await sdk.threads.getHistory(tid);
    assert.ok(history.length >= 3, `history has ${history.length} states`);
    assert.equal(history[0].checkpoint.checkpoint_id, state.checkpoint.checkpoint_id);
    const limited = await sdk.threads.getHistory(tid, { limit: 1 });
    assert.equal(limited.length, 1);

    const waited = await sdk.runs.wait(tid, "fast", { input: say("again") });
    assert.deepEqual(
      waited.messages.map((m) => m.type),
      ["human", "ai", "human", "ai"],
    );

    const run = await sdk.runs.create(tid, "fast", { input: say("third") });
    assert.equal(run.status, "pending");
    const joined = await sdk.runs.join(tid, run.run_id);
    assert.equal(joined.messages.length, 6);
    assert.equal((await sdk.runs.get(tid, run.run_id)).status, "success");
    const runs = await sdk.runs.list(tid);
    assert.deepEqual(
      runs.map((r) => r.status),
      ["success", "success", "success"],
    );

    const got = await sdk.threads.get(tid);
    assert.equal(got.status, "idle");
    assert.equal(got.metadata.owner, "js-sdk");
    const found = await sdk.threads.search({ metadata: { owner: "js-sdk" } });
    assert.ok(found.some((t) => t.thread_id === tid));
  });

  test("abort mid-stream, then joinStream gets exactly the rest", async () => {
    const sdk = client();
    const tid = (await sdk.threads.create()).thread_id;
    const controller = new AbortController();
    const seen = [];
    try {
      for await (const part of sdk.runs.stream(tid, "slow", {
        input: say("resume me"),
        streamMode: ["messages-tuple", "values"],
        streamResumable: true,
        onDisconnect: "continue",
        signal: controller.signal,
      })) {
        seen.push(part);
        if (seen.length === 10) controller.abort(); // the connection drops; the run goes on
      }
    } catch (err) {
      assert.equal(err.name, "AbortError");
    }
    assert.equal(seen.length, 10);
    assert.equal(seen[0].event, "metadata");
    const runId = seen[0].data.run_id;
    assert.notEqual((await sdk.runs.get(tid, runId)).status, "success", "resumed while running");

    const rest = await collect(sdk.runs.joinStream(tid, runId, { lastEventId: seen.at(-1).id }));
    const everything = await collect(sdk.runs.joinStream(tid, runId, { lastEventId: "-1" }));
    const ids = [...seen, ...rest].map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, "no duplicates");
    assert.deepEqual(
      ids,
      everything.map((p) => p.id),
    );
    assert.ok(rest.length > 0);
    assert.equal(words(messageText(everything)), SLOW_WORDS);
    assert.equal(messageText([...seen, ...rest]), messageText(everything));
    assert.equal((await sdk.runs.get(tid, runId)).status, "success");
  });

  test("cancel with action interrupt keeps the partial message", async () => {
    const sdk = client();
    const [tid, fullTid] = await Promise.all([
      sdk.threads.create().then((t) => t.thread_id),
      sdk.threads.create().then((t) => t.thread_id),
    ]);
    // The same input on a fresh thread gives the same reply: the uncancelled reference.
    const full = sdk.runs.wait(fullTid, "slow", { input: say("stop me") });

    const seen = [];
    let cancelled;
    for await (const part of sdk.runs.stream(tid, "slow", {
      input: say("stop me"),
      streamMode: ["messages-tuple", "values"],
      streamResumable: true,
    })) {
      seen.push(part);
      if (!cancelled && seen.filter((p) => p.event === "messages").length === 10) {
        cancelled = sdk.runs.cancel(tid, seen[0].data.run_id, true, "interrupt");
      }
    }
    await cancelled;
    const runId = seen[0].data.run_id;
    assert.equal((await sdk.runs.get(tid, runId)).status, "interrupted");

    const state = await sdk.threads.getState(tid);
    const messages = state.values.messages;
    assert.deepEqual(
      messages.map((m) => m.type),
      ["human", "ai"],
    );
    const partial = textOf(messages[1]);
    const fullText = textOf((await full).messages[1]);
    assert.equal(words(fullText), SLOW_WORDS);
    assert.ok(partial.length > 0, "the partial message is not empty");
    assert.ok(partial.length < fullText.length, "the run was stopped before its end");
    assert.ok(fullText.startsWith(partial), `${partial} is a prefix of the full reply`);
    assert.ok(partial.startsWith(messageText(seen)), "what was streamed is in the thread");
    assert.equal(messages[1].response_metadata?.finish_reason, "cancelled");
  });

  test("multitask strategies: reject gives 409, enqueue runs in order", async () => {
    const sdk = client();
    const tid = (await sdk.threads.create()).thread_id;
    const first = await sdk.runs.create(tid, "slow", { input: say("one") });
    await eventually(async () => (await sdk.runs.get(tid, first.run_id)).status === "running", {
      what: "the first run to start",
    });

    await assert.rejects(
      sdk.runs.create(tid, "fast", { input: say("rejected"), multitaskStrategy: "reject" }),
      (err) => {
        assert.equal(err.status, 409);
        return true;
      },
    );
    await assert.rejects(
      (async () => {
        for await (const _ of sdk.runs.stream(tid, "fast", {
          input: say("rejected"),
          multitaskStrategy: "reject",
        }));
      })(),
      (err) => err.status === 409,
    );

    const second = await sdk.runs.create(tid, "fast", {
      input: say("two"),
      multitaskStrategy: "enqueue",
    });
    assert.equal(second.status, "pending");
    const joined = await sdk.runs.join(tid, second.run_id);
    assert.equal((await sdk.runs.get(tid, first.run_id)).status, "success");
    assert.equal((await sdk.runs.get(tid, second.run_id)).status, "success");
    assert.deepEqual(
      joined.messages.map((m) => [m.type, m.type === "human" ? textOf(m) : undefined]),
      [
        ["human", "one"],
        ["ai", undefined],
        ["human", "two"],
        ["ai", undefined],
      ],
    );
    assert.equal(words(textOf(joined.messages[1])), SLOW_WORDS);
    assert.equal(words(textOf(joined.messages[3])), FAST_WORDS);
  });

  test("threads.joinStream joins the active run; runs.joinStream filters stream modes", async () => {
    const sdk = client();
    const tid = (await sdk.threads.create()).thread_id;
    assert.deepEqual(await collect(sdk.threads.joinStream(tid)), [], "nothing active: empty");

    // "slow", so the run is still active when the join arrives
    const run = await sdk.runs.create(tid, "slow", {
      input: say("join the thread"),
      streamMode: ["values", "messages-tuple"],
    });
    const joined = await collect(sdk.threads.joinStream(tid, { lastEventId: "-1" }));
    assert.equal(joined[0].event, "metadata");
    assert.equal(joined[0].data.run_id, run.run_id);
    assert.equal(words(messageText(joined)), SLOW_WORDS);

    const valuesOnly = await collect(
      sdk.runs.joinStream(tid, run.run_id, { lastEventId: "-1", streamMode: ["values"] }),
    );
    assert.deepEqual([...new Set(valuesOnly.map((p) => p.event))], ["metadata", "values"]);
  });

  test("stateless runs.stream", async () => {
    const sdk = client();
    const parts = await collect(
      sdk.runs.stream(null, "fast", {
        input: say("no thread"),
        streamMode: ["values", "messages-tuple"],
      }),
    );
    assert.equal(parts[0].event, "metadata");
    const finalValues = parts.filter((p) => p.event === "values").at(-1).data;
    assert.deepEqual(
      finalValues.messages.map((m) => m.type),
      ["human", "ai"],
    );
    assert.equal(textOf(finalValues.messages[1]), messageText(parts));
    assert.equal(words(messageText(parts)), FAST_WORDS);
  });

  test("a failing run ends its stream with an error event", async () => {
    const sdk = client();
    const tid = (await sdk.threads.create()).thread_id;
    const parts = await collect(
      sdk.runs.stream(tid, "failing", { input: say("boom"), streamMode: ["messages-tuple"] }),
    );
    const last = parts.at(-1);
    assert.equal(last.event, "error");
    assert.match(JSON.stringify(last.data), /the model caught fire/);
    const runId = parts[0].data.run_id;
    assert.equal((await sdk.runs.get(tid, runId)).status, "error");
  });

  test("assistants are the configured graphs", async () => {
    const sdk = client();
    const found = await sdk.assistants.search({ limit: 100 });
    const graphs = new Set(found.map((a) => a.graph_id));
    for (const g of ["agent", "fast", "slow", "failing"]) assert.ok(graphs.has(g), g);
    const fast = found.find((a) => a.graph_id === "fast");
    assert.equal((await sdk.assistants.get(fast.assistant_id)).graph_id, "fast");
    const graph = await sdk.assistants.getGraph(fast.assistant_id);
    assert.ok(graph.nodes.some((n) => n.id === "llm"));
  });
});
