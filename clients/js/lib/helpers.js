// Shared by the test files: the server URL, inputs, polling, and a "browser tab" whose
// connections can all be dropped at once (what a refresh or a network switch does).
import { Client } from "@langchain/langgraph-sdk";

export const URL = (() => {
  const url = process.env.TOKENRELAY_URL;
  if (!url) {
    throw new Error("set TOKENRELAY_URL to a running tokenrelay, e.g. http://127.0.0.1:2024");
  }
  return url.replace(/\/$/, "");
})();

export const say = (text) => ({ messages: [{ role: "user", content: text }] });

export const client = () => new Client({ apiUrl: URL });

/** The text of a LangChain message dict (string content or a list of content blocks). */
export function textOf(message) {
  const { content } = message;
  if (typeof content === "string") return content;
  return content.map((c) => (typeof c === "string" ? c : (c.text ?? ""))).join("");
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `fn` until it returns a truthy value (returned), or fails after `timeout` ms. */
export async function eventually(fn, { timeout = 15000, interval = 20, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await sleep(interval);
  }
}

/**
 * A fetch that belongs to one "tab": `close()` drops every connection it opened, mid-body
 * included, and refuses new ones, as closing or reloading a page does.
 */
export function browserTab() {
  const controllers = new Set();
  let closed = false;
  const tabFetch = (input, init = {}) => {
    if (closed) return Promise.reject(new DOMException("the tab is closed", "AbortError"));
    const controller = new AbortController();
    controllers.add(controller);
    const signal = init.signal ? AbortSignal.any([init.signal, controller.signal]) : controller.signal;
    return fetch(input, { ...init, signal });
  };
  return {
    fetch: tabFetch,
    client: () => new Client({ apiUrl: URL, callerOptions: { fetch: tabFetch, maxRetries: 0 } }),
    close() {
      closed = true;
      for (const c of controllers) c.abort(new DOMException("the tab was closed", "AbortError"));
    },
  };
}

/** The thread's saved state, via the LangGraph client. */
export async function threadMessages(threadId) {
  const state = await client().threads.getState(threadId);
  return state.values?.messages ?? [];
}
