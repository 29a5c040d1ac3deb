// The JS client with a bearer token, against a project whose langgraph_sdk.Auth object gives
// each user their own threads. TOKENRELAY_BEARER and TOKENRELAY_BEARER_OTHER are two users'.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Client } from "@langchain/langgraph-sdk";

import { URL, say, textOf } from "../lib/helpers.js";

const as = (token) =>
  new Client({ apiUrl: URL, defaultHeaders: { Authorization: `Bearer ${token}` } });

for (const name of ["TOKENRELAY_BEARER", "TOKENRELAY_BEARER_OTHER"]) {
  if (!process.env[name]) throw new Error(`set ${name} to a user's bearer token`);
}

async function status(promise) {
  try {
    await promise;
  } catch (err) {
    return err.status;
  }
  return 200;
}

describe("@langchain/langgraph-sdk Client with a bearer token", { timeout: 60000 }, () => {
  test("a user streams on their own thread; the other user gets 404s", async () => {
    const me = as(process.env.TOKENRELAY_BEARER);
    const other = as(process.env.TOKENRELAY_BEARER_OTHER);

    const thread = await me.threads.create({ metadata: { from: "js" } });
    const tid = thread.thread_id;
    assert.equal(thread.metadata.from, "js");
    assert.ok(thread.metadata.owner, "the auth handler wrote the owner");

    const parts = [];
    for await (const part of me.runs.stream(tid, "agent", {
      input: say("hello from js"),
      streamMode: ["messages-tuple", "values"],
      streamResumable: true,
    })) {
      parts.push(part);
    }
    assert.equal(parts[0].event, "metadata");
    const text = parts
      .filter((p) => p.event === "messages")
      .map((p) => textOf(p.data[0]))
      .join("");
    const final = parts.filter((p) => p.event === "values").at(-1).data;
    assert.equal(textOf(final.messages.at(-1)), text);

    const mine = await me.threads.search({ limit: 100 });
    assert.ok(mine.some((t) => t.thread_id === tid));
    const theirs = await other.threads.search({ limit: 100 });
    assert.ok(!theirs.some((t) => t.thread_id === tid));

    assert.equal(await status(other.threads.get(tid)), 404);
    assert.equal(await status(other.threads.getState(tid)), 404);
    assert.equal(await status(other.runs.list(tid)), 404);
    const runId = parts[0].data.run_id;
    assert.equal(await status(other.runs.cancel(tid, runId)), 404);

    const anonymous = new Client({ apiUrl: URL });
    assert.equal(await status(anonymous.threads.get(tid)), 401);
  });
});
