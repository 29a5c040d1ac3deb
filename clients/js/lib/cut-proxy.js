// A tiny HTTP + WebSocket proxy in front of the server under test that cuts ONE event stream
// mid-body, the way a flaky proxy or a mobile network does: after `cutAfterBytes` bytes of the
// first matching response body (or of the first WebSocket's server-to-client bytes) it writes
// those bytes (usually ending mid-event) and destroys the connection. Everything else is
// forwarded untouched.
import http from "node:http";
import net from "node:net";

/**
 * @param {object} options
 * @param {string} options.target       upstream base URL, e.g. http://127.0.0.1:2099
 * @param {number} options.cutAfterBytes bytes of the stream body let through before the cut
 * @param {(path: string, body: string) => boolean} [options.shouldCut]
 *   which SSE requests may be cut (default: POST .../stream/events asking for "messages")
 * @param {boolean} [options.cutWebSocket] cut the first WebSocket too (default true)
 */
export async function startCutProxy({
  target,
  cutAfterBytes,
  shouldCut = (path, body) => /\/stream\/events$/.test(path) && body.includes('"messages"'),
  cutWebSocket = true,
}) {
  const upstream = new URL(target);
  const stats = { cuts: 0, streamRequests: 0, webSockets: 0, requests: [] };
  let armed = true;
  const sockets = new Set();

  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const path = req.url.split("?")[0];
      stats.requests.push(`${req.method} ${req.url}`);
      if (path.endsWith("/stream/events")) stats.streamRequests += 1;
      const cutThis = armed && req.method === "POST" && shouldCut(path, body.toString("utf8"));
      if (cutThis) armed = false;
      const headers = { ...req.headers, host: upstream.host };
      delete headers["content-length"];
      if (body.length) headers["content-length"] = String(body.length);
      const up = http.request(
        {
          host: upstream.hostname,
          port: upstream.port,
          method: req.method,
          path: req.url,
          headers,
        },
        (upRes) => {
          res.writeHead(upRes.statusCode ?? 502, upRes.statusMessage, upRes.headers);
          res.flushHeaders();
          if (!cutThis) {
            upRes.pipe(res);
            return;
          }
          let sent = 0;
          upRes.on("data", (chunk) => {
            if (sent >= cutAfterBytes) return;
            const room = cutAfterBytes - sent;
            const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
            sent += part.length;
            res.write(part);
            if (sent >= cutAfterBytes) {
              stats.cuts += 1;
              // No terminating chunk: the client sees the body fail mid-read.
              setTimeout(() => {
                res.socket?.destroy();
                upRes.destroy();
                up.destroy();
              }, 20);
            }
          });
          upRes.on("end", () => res.end());
        },
      );
      up.on("error", () => res.destroy());
      res.on("close", () => up.destroy());
      up.end(body);
    });
  });

  server.on("upgrade", (req, socket, head) => {
    stats.webSockets += 1;
    stats.requests.push(`WS ${req.url}`);
    const cutThis = cutWebSocket && armed;
    if (cutThis) armed = false;
    const up = net.connect(Number(upstream.port), upstream.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i];
        // No permessage-deflate: the byte budget then counts plain JSON frames.
        if (name.toLowerCase() === "sec-websocket-extensions") continue;
        const value = name.toLowerCase() === "host" ? upstream.host : req.rawHeaders[i + 1];
        lines.push(`${name}: ${value}`);
      }
      up.write(`${lines.join("\r\n")}\r\n\r\n`);
      if (head?.length) up.write(head);
      socket.pipe(up);
      if (!cutThis) {
        up.pipe(socket);
        return;
      }
      // Count server-to-client bytes after the 101 answer (the handshake is ~200 bytes; the
      // budget is for frames, so it starts after the first blank line).
      let handshakeDone = false;
      let sent = 0;
      up.on("data", (chunk) => {
        let data = chunk;
        if (!handshakeDone) {
          const end = data.indexOf("\r\n\r\n");
          if (end < 0) {
            socket.write(data);
            return;
          }
          socket.write(data.subarray(0, end + 4));
          data = data.subarray(end + 4);
          handshakeDone = true;
        }
        if (sent >= cutAfterBytes || data.length === 0) return;
        const room = cutAfterBytes - sent;
        const part = data.length > room ? data.subarray(0, room) : data;
        sent += part.length;
        socket.write(part);
        if (sent >= cutAfterBytes) {
          stats.cuts += 1;
          setTimeout(() => {
            socket.destroy();
            up.destroy();
          }, 20);
        }
      });
    });
    const drop = () => {
      socket.destroy();
      up.destroy();
    };
    up.on("error", drop);
    socket.on("error", drop);
    up.on("close", () => socket.destroy());
    socket.on("close", () => up.destroy());
  });

  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    stats,
    /** Re-arm: the next matching stream is cut again. */
    arm() {
      armed = true;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
