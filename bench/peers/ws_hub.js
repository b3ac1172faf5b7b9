'use strict';
// Peer hub for the tidings benchmark: Node.js + the `ws` package.
//
// The classic ws pub/sub hub: one http.Server on the port answering GET /health,
// a WebSocketServer on /ws sharing it, topics as Map<topic, Set<WebSocket>>, the
// usual isAlive/ping heartbeat. Each event is JSON-encoded once into a Buffer and
// that same Buffer is sent (as a text frame) to every subscriber.
//
// Per-client queue: `ws.send()` never blocks; what the socket cannot take yet is
// buffered in user space. Each client counts its sends whose write callback has
// not fired yet (= messages not handed to the kernel); at 256 the next message
// for that client is dropped and counted, so a slow client sees a seq gap and
// never slows the others.
//
// Run: node bench/peers/ws_hub.js --port 8802   (--port 0 picks a free port)

const http = require('node:http');
const { WebSocketServer, WebSocket } = require('ws');

const HOST = '127.0.0.1';
const WS_PATH = '/ws';
const QUEUE_SIZE = 256;
const MAX_MESSAGE = 512 * 1024;
const PING_INTERVAL_MS = 30_000; // a ping every 30 s; no pong by the next round: terminated
const LISTEN_BACKLOG = 4096; // same as tidings
const SEND_OPTS = { binary: false, compress: false };

function parsePort(argv) {
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--port') return Number(argv[i + 1]);
    if (arg.startsWith('--port=')) return Number(arg.slice('--port='.length));
  }
  return 8802;
}

const port = parsePort(process.argv.slice(2));
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('usage: node ws_hub.js --port PORT');
  process.exit(2);
}

/** @type {Map<string, Set<WebSocket>>} */
const topics = new Map();
/** @type {Map<string, number>} */
const seqs = new Map();
let dropped = 0;

function enqueue(ws, data) {
  if (ws.readyState !== WebSocket.OPEN) return;
  if (ws.pending >= QUEUE_SIZE) {
    dropped++;
    return;
  }
  ws.pending++;
  ws.send(data, SEND_OPTS, ws.onSent);
}

function reply(ws, topic, requestId, payload) {
  const frame = { type: 'response', topic };
  if (requestId !== undefined && requestId !== null) frame.requestId = requestId;
  frame.payload = payload;
  enqueue(ws, Buffer.from(JSON.stringify(frame)));
}

function error(ws, message) {
  enqueue(
    ws,
    Buffer.from(JSON.stringify({ type: 'error', payload: { code: 'invalid_message', message } })),
  );
}

function unsubscribe(ws, topic) {
  const subs = topics.get(topic);
  if (subs !== undefined) {
    subs.delete(ws);
    if (subs.size === 0) topics.delete(topic);
  }
  ws.topics.delete(topic);
}

function handle(ws, data) {
  let msg;
  try {
    msg = JSON.parse(data.toString());
  } catch {
    return error(ws, 'message is not valid JSON');
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    return error(ws, 'message must be a JSON object');
  }
  const { type, topic, requestId } = msg;
  if (type !== 'subscribe' && type !== 'publish' && type !== 'unsubscribe') {
    return error(ws, 'unknown message type');
  }
  if (typeof topic !== 'string' || topic.length === 0) {
    return error(ws, "field 'topic' must be a non-empty string");
  }

  if (type === 'publish') {
    if (!('payload' in msg)) return error(ws, "field 'payload' is required");
    const seq = (seqs.get(topic) || 0) + 1;
    seqs.set(topic, seq);
    const subs = topics.get(topic);
    if (subs !== undefined && subs.size > 0) {
      const event = Buffer.from(
        JSON.stringify({
          type: 'event',
          topic,
          seq,
          payload: msg.payload,
          timestamp: new Date().toISOString(),
        }),
      );
      for (const sub of subs) enqueue(sub, event);
    }
    return reply(ws, topic, requestId, { status: 'published', seq });
  }

  if (type === 'subscribe') {
    let subs = topics.get(topic);
    if (subs === undefined) {
      subs = new Set();
      topics.set(topic, subs);
    }
    subs.add(ws);
    ws.topics.add(topic);
    return reply(ws, topic, requestId, { status: 'subscribed', topic, seq: seqs.get(topic) || 0 });
  }

  unsubscribe(ws, topic);
  return reply(ws, topic, requestId, { status: 'unsubscribed', topic });
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?', 1)[0];
  if (req.method === 'GET' && path === '/health') {
    const body = JSON.stringify({ status: 'ok', connections: wss.clients.size });
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'Content-Length': Buffer.byteLength(body),
    });
    res.end(body);
    return;
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found\n');
});

const wss = new WebSocketServer({
  server,
  path: WS_PATH,
  perMessageDeflate: false,
  maxPayload: MAX_MESSAGE,
  clientTracking: true,
});

wss.on('connection', (ws) => {
  ws.topics = new Set();
  ws.pending = 0;
  ws.onSent = () => {
    ws.pending--;
  };
  ws.isAlive = true;
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.on('message', (data) => handle(ws, data));
  ws.on('error', () => {}); // e.g. maxPayload exceeded; 'close' follows
  ws.on('close', () => {
    for (const topic of ws.topics) unsubscribe(ws, topic);
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, PING_INTERVAL_MS);

function exit() {
  if (dropped > 0) console.error(`dropped ${dropped} messages on full client queues`);
  process.exit(0);
}

function shutdown() {
  clearInterval(heartbeat);
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  wss.close();
  server.close(exit); // once every connection has ended ...
  setTimeout(exit, 2000); // ... or after 2 s at most
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen({ host: HOST, port, backlog: LISTEN_BACKLOG }, () => {
  process.stdout.write(`listening on ws://${HOST}:${server.address().port}${WS_PATH}\n`);
});
