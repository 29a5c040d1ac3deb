// Benchmark peer: Vercel's `resumable-stream` (2.2.13) behind a plain node:http server.
//
// The wiring follows the package README's "Usage with explicit resumption" route handlers:
//   POST -> streamContext.createNewResumableStream(streamId, makeStream)
//   GET  -> streamContext.resumeExistingStream(streamId, skipCharacters)
// with `waitUntil` standing in for Next.js `after()` (here it only counts live producers: a
// long-running Node process needs nothing to keep it alive).
//
// Env: PORT (3100), HOST (127.0.0.1), REDIS_URL (redis://127.0.0.1:6379),
//      KEY_PREFIX (resumable-stream; the package's `keyPrefix` option).

import http from "node:http";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { setTimeout as sleep, setImmediate as yieldToLoop } from "node:timers/promises";
import { createClient } from "redis";
import { createResumableStreamContext } from "resumable-stream";

const PORT = Number.parseInt(process.env.PORT || "3100", 10);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const KEY_PREFIX = process.env.KEY_PREFIX || "resumable-stream";

const DEFAULTS = { tokens: 100, interval_ms: 50, burst: 0, pad: 16, start_in_ms: 0 };
const UNPACED_YIELD_EVERY = 64;

const stats = {
  activeProducers: 0, // producers whose waitUntil promise has not settled yet
  connections: 0, // open TCP connections to this server
  activeResponses: 0, // event-stream responses currently being written
  backgroundDrains: 0, // background streams drained server-side
  producersStarted: 0,
  resumes: 0,
  errors: 0,
};

const LOOP_RESOLUTION_MS = 10;
const loopDelay = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
loopDelay.enable();

// ---------------------------------------------------------------- errors, logged sparingly
let loggedErrors = 0;
function noteError(where, err) {
  stats.errors += 1;
  if (loggedErrors < 20) {
    loggedErrors += 1;
    console.error(`[resumable-stream peer] ${where}:`, err?.stack || err);
  }
}
// The package's producer loop awaits Redis publishes inside a detached promise chain; a failure
// there would otherwise be an unhandled rejection that kills the process.
process.on("unhandledRejection", (err) => noteError("unhandledRejection", err));

// ---------------------------------------------------------------- Redis + stream context
const publisher = createClient({ url: REDIS_URL });
const subscriber = createClient({ url: REDIS_URL });
publisher.on("error", (err) => noteError("redis publisher", err));
subscriber.on("error", (err) => noteError("redis subscriber", err));
const redisReady = () => publisher.isReady && subscriber.isReady;

const streamContext = createResumableStreamContext({
  keyPrefix: KEY_PREFIX,
  // Our own clients, so REDIS_URL has a default (the package's own default clients throw
  // without REDIS_URL/KV_URL). The package does not connect clients it is handed.
  publisher,
  subscriber,
  // Next.js would pass `after`; a plain server just has to let the promise run.
  waitUntil: (promise) => {
    stats.activeProducers += 1;
    promise.then(
      () => { stats.activeProducers -= 1; },
      (err) => { stats.activeProducers -= 1; noteError("producer", err); },
    );
  },
});

// ids with a producer running in this process (freed when the producer emits [DONE], whether
// or not anyone still reads): a second POST for the same id gets 409 instead of a second
// producer overwriting the sentinel (the package itself does not check).
const liveIds = new Set();

// ---------------------------------------------------------------- producer
// CLOCK_MONOTONIC nanoseconds, the clock Python's time.monotonic_ns() reads on Linux, so the
// load generator can subtract it from its own receive time exactly (a wall clock derived from
// performance.timeOrigin drifts by milliseconds from the system's).
function monoNs() {
  return process.hrtime.bigint().toString().padStart(19, "0");
}

/**
 * A ReadableStream<string> of `tokens` SSE events then `data: [DONE]`.
 * t0 is start_in_ms after the start. Token k < burst is emitted at t0; token k >= burst is due
 * at t0 + (k - burst + 1) * interval,
 * i.e. every interval after the burst (absolute schedule, so timer lateness does not accumulate).
 * interval 0 = unpaced: as fast as the stream is pulled, yielding to the event loop every 64 tokens.
 * Pull-based: a token is generated (and time-stamped) only when the consumer asks for one.
 */
function makeProducer({ tokens, interval_ms: intervalMs, burst, pad, start_in_ms: startIn }, onEnd) {
  const filler = "x".repeat(pad);
  let i = 0;
  let t0 = 0;
  let baseNs = 0n; // hrtime at performance.now() === basePerf: converts due times to monotonic ns
  let basePerf = 0;
  return new ReadableStream(
    {
      start() {
        basePerf = performance.now();
        baseNs = process.hrtime.bigint();
        t0 = basePerf + startIn; // start_in_ms delays the first token
      },
      async pull(controller) {
        if (i >= tokens) {
          controller.enqueue("data: [DONE]\n\n");
          controller.close();
          onEnd?.();
          return;
        }
        if (i === 0 || (intervalMs > 0 && i < burst)) {
          const wait = t0 - performance.now();
          if (wait > 0) await sleep(wait);
        }
        if (intervalMs > 0) {
          if (i >= burst) {
            const wait = t0 + (i - burst + 1) * intervalMs - performance.now();
            if (wait > 0) await sleep(wait);
          }
        } else if (i > 0 && i % UNPACED_YIELD_EVERY === 0) {
          await yieldToLoop();
        }
        // Due by the schedule (as bench/pacing.py): the burst at t0, then every interval; unpaced,
        // every token is due at t0.
        const due = intervalMs > 0 && i >= burst ? t0 + (i - burst + 1) * intervalMs : t0;
        const dueNs = (baseNs + BigInt(Math.round((due - basePerf) * 1e6))).toString().padStart(19, "0");
        controller.enqueue(`data: {"i":${i},"content":"ts${monoNs()} du${dueNs} n${i} ${filler}"}\n\n`);
        i += 1;
      },
    },
    { highWaterMark: 0 }, // generate on demand only, never ahead of a read
  );
}

// ---------------------------------------------------------------- HTTP helpers
function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
    "Cache-Control": "no-cache",
  });
  res.end(text);
}

const SSE_HEADERS = {
  "Content-Type": "text/event-stream",
  "Cache-Control": "no-cache",
  "X-Accel-Buffering": "no",
};

/** Copy a ReadableStream<string> to the response, honouring the socket's backpressure. */
async function pipeToResponse(stream, req, res) {
  const reader = stream.getReader();
  let gone = false;
  let wakeDrain = null;
  const onClose = () => {
    gone = true;
    if (wakeDrain) wakeDrain();
    reader.cancel().catch(() => {});
  };
  res.on("close", onClose);
  res.writeHead(200, SSE_HEADERS);
  res.flushHeaders();
  stats.activeResponses += 1;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done || gone) break;
      if (value === "" || value === undefined) continue; // the package acks a resume with "" when nothing is buffered
      if (!res.write(value)) {
        await new Promise((resolve) => {
          wakeDrain = resolve;
          res.once("drain", resolve);
        });
        wakeDrain = null;
        if (gone) break;
      }
    }
    if (!gone) res.end();
  } catch (err) {
    if (!gone) {
      noteError("pipe", err);
      res.destroy(err);
    }
  } finally {
    stats.activeResponses -= 1;
    res.off("close", onClose);
  }
}

function intParam(params, name, { allowFloat = false } = {}) {
  const raw = params.get(name);
  if (raw === null || raw === "") return DEFAULTS[name];
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0 || (!allowFloat && !Number.isInteger(value))) {
    throw new RangeError(`${name} must be a non-negative ${allowFloat ? "number" : "integer"}`);
  }
  return value;
}

function producerParams(params) {
  return {
    tokens: intParam(params, "tokens"),
    interval_ms: intParam(params, "interval_ms", { allowFloat: true }),
    burst: intParam(params, "burst"),
    pad: intParam(params, "pad"),
    start_in_ms: intParam(params, "start_in_ms", { allowFloat: true }),
  };
}

/** createNewResumableStream for `id`; resolves once the sentinel is set in Redis. */
async function startProducer(id, opts) {
  liveIds.add(id);
  stats.producersStarted += 1;
  let stream;
  try {
    stream = await streamContext.createNewResumableStream(id, () =>
      makeProducer(opts, () => liveIds.delete(id)),
    );
  } catch (err) {
    liveIds.delete(id);
    throw err;
  }
  return stream;
}

// ---------------------------------------------------------------- routes
async function postStream(id, params, res, req) {
  const opts = producerParams(params);
  if (liveIds.has(id)) return sendJson(res, 409, { detail: `stream ${id} is already being produced` });
  const stream = await startProducer(id, opts);
  await pipeToResponse(stream, req, res);
}

async function postBackground(id, params, res) {
  const opts = producerParams(params);
  if (liveIds.has(id)) return sendJson(res, 409, { detail: `stream ${id} is already being produced` });
  const stream = await startProducer(id, opts);
  // Registered in Redis (request channel subscribed, sentinel set): a GET can resume now.
  sendJson(res, 202, { id });
  // What waitUntil/after() does for a Vercel function whose client left: keep the producer
  // running to the end. Here we also read the package's output so it does not pile up unread.
  stats.backgroundDrains += 1;
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done } = await reader.read();
      if (done) break;
    }
  } finally {
    stats.backgroundDrains -= 1;
  }
}

async function getStream(id, params, res, req) {
  let skip;
  const raw = params.get("skip");
  if (raw !== null && raw !== "") {
    skip = Number(raw);
    if (!Number.isInteger(skip) || skip < 0) {
      return sendJson(res, 400, { detail: "skip must be a non-negative integer" });
    }
  }
  stats.resumes += 1;
  let stream;
  try {
    stream = await streamContext.resumeExistingStream(id, skip);
  } catch (err) {
    // The package rejects with "Timeout waiting for ack" when no producer answers within 1 s.
    return sendJson(res, 504, { detail: `resume failed: ${err?.message || err}` });
  }
  if (stream === undefined) return sendJson(res, 404, { detail: `no stream ${id}` });
  if (stream === null) {
    // The README answers 422 "Stream is already done"; the bench's contract is 204.
    res.writeHead(204, { "Cache-Control": "no-cache" });
    return res.end();
  }
  await pipeToResponse(stream, req, res);
}

const STREAM_PATH = /^\/streams\/([^/]+)(\/background)?$/;

async function handle(req, res) {
  const url = new URL(req.url, "http://peer");
  const path = url.pathname;

  if (path === "/healthz") {
    if (req.method !== "GET") return sendJson(res, 405, { detail: "method not allowed" });
    if (!redisReady()) return sendJson(res, 503, { detail: "redis not connected" });
    return sendJson(res, 200, { ok: true });
  }
  if (path === "/stats") {
    if (req.method !== "GET") return sendJson(res, 405, { detail: "method not allowed" });
    // The histogram includes the 10 ms sampling period itself; report the lag beyond it.
    const lag = (ns) => +Math.max(0, ns / 1e6 - LOOP_RESOLUTION_MS).toFixed(2);
    const loopDelayMs = {
      p50: lag(loopDelay.percentile(50)),
      p99: lag(loopDelay.percentile(99)),
      max: lag(loopDelay.max),
    };
    if (url.searchParams.has("reset")) loopDelay.reset();
    return sendJson(res, 200, {
      ...stats,
      liveIds: liveIds.size,
      rssMiB: Math.round(process.memoryUsage.rss() / 1048576),
      loopDelayMs, // since start or the last /stats?reset
    });
  }

  const m = STREAM_PATH.exec(path);
  if (!m) return sendJson(res, 404, { detail: "not found" });
  let id;
  try {
    id = decodeURIComponent(m[1]);
  } catch {
    return sendJson(res, 400, { detail: "bad stream id" });
  }
  if (!redisReady()) return sendJson(res, 503, { detail: "redis not connected" });
  if (m[2]) {
    if (req.method !== "POST") return sendJson(res, 405, { detail: "method not allowed" });
    return postBackground(id, url.searchParams, res);
  }
  if (req.method === "POST") return postStream(id, url.searchParams, res, req);
  if (req.method === "GET") return getStream(id, url.searchParams, res, req);
  return sendJson(res, 405, { detail: "method not allowed" });
}

const server = http.createServer((req, res) => {
  req.resume(); // bodies are ignored; drain them so keep-alive connections stay usable
  handle(req, res).catch((err) => {
    if (err instanceof RangeError) {
      if (!res.headersSent) return sendJson(res, 400, { detail: err.message });
    }
    noteError(`${req.method} ${req.url}`, err);
    if (!res.headersSent) sendJson(res, 500, { detail: String(err?.message || err) });
    else res.destroy();
  });
});

server.maxConnections = Infinity; // no cap (Node's default is also none)
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000; // must exceed keepAliveTimeout
server.requestTimeout = 0; // streams may run for minutes
server.timeout = 0;
server.on("connection", (socket) => {
  stats.connections += 1;
  socket.setNoDelay(true);
  socket.once("close", () => { stats.connections -= 1; });
});
server.on("clientError", (_err, socket) => {
  if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
  else socket.destroy();
});

await Promise.all([publisher.connect(), subscriber.connect()]);
server.listen({ port: PORT, host: HOST, backlog: 4096 }, () => {
  console.log(`resumable-stream peer listening on http://${HOST}:${PORT} (redis ${REDIS_URL}, keyPrefix ${KEY_PREFIX})`);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  Promise.allSettled([publisher.quit(), subscriber.quit()]).finally(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
