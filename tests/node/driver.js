// Drives the unmodified centrifuge npm SDK for tests/test_centrifugo_node.py.
//
//   node driver.js WS_URL [TOKEN]
//
// Every SDK event goes to stdout as one JSON line ({"event": ...}); commands come
// on stdin, one JSON object a line ({"cmd": "publish", "id": 3, "data": ...}),
// and each is answered with {"event": "result", "id": 3, "result"|"error": ...}.
// Node 20 has no WebSocket of its own: the `ws` package is the SDK's `websocket`.
'use strict';

const readline = require('node:readline');
const WebSocket = require('ws');
const { Centrifuge } = require('centrifuge');

const [url, token] = process.argv.slice(2);

function out(message) {
  process.stdout.write(JSON.stringify(message) + '\n');
}

const client = new Centrifuge(url, {
  websocket: WebSocket,
  token: token || '',
  minReconnectDelay: 1000,
  maxReconnectDelay: 1000,
  timeout: 5000,
});

client.on('connecting', (ctx) => out({ event: 'connecting', code: ctx.code, reason: ctx.reason }));
client.on('connected', (ctx) => out({ event: 'connected', client: ctx.client }));
client.on('disconnected', (ctx) => out({ event: 'disconnected', code: ctx.code, reason: ctx.reason }));
client.on('error', (ctx) => out({ event: 'client_error', type: ctx.type, error: ctx.error }));

const subs = {};

function subscription(channel) {
  if (subs[channel]) {
    return subs[channel];
  }
  const sub = client.newSubscription(channel, { positioned: true, recoverable: true, joinLeave: true });
  sub.on('subscribing', (ctx) => out({ event: 'subscribing', channel, code: ctx.code }));
  sub.on('subscribed', (ctx) => out({
    event: 'subscribed',
    channel,
    recoverable: ctx.recoverable,
    positioned: ctx.positioned,
    wasRecovering: ctx.wasRecovering,
    recovered: ctx.recovered,
    streamPosition: ctx.streamPosition || null,
  }));
  sub.on('unsubscribed', (ctx) => out({ event: 'unsubscribed', channel, code: ctx.code, reason: ctx.reason }));
  sub.on('publication', (ctx) => out({ event: 'publication', channel, data: ctx.data, offset: ctx.offset }));
  sub.on('join', (ctx) => out({ event: 'join', channel, info: ctx.info }));
  sub.on('leave', (ctx) => out({ event: 'leave', channel, info: ctx.info }));
  sub.on('error', (ctx) => out({ event: 'sub_error', channel, error: ctx.error }));
  subs[channel] = sub;
  return sub;
}

const commands = {
  connect: async () => { client.connect(); return null; },
  disconnect: async () => { client.disconnect(); return null; },
  subscribe: async (cmd) => { subscription(cmd.channel).subscribe(); return null; },
  unsubscribe: async (cmd) => { subscription(cmd.channel).unsubscribe(); return null; },
  publish: async (cmd) => subscription(cmd.channel).publish(cmd.data),
  rpc: async (cmd) => client.rpc(cmd.method, cmd.data),
  presence: async (cmd) => client.presence(cmd.channel),
  presence_stats: async (cmd) => client.presenceStats(cmd.channel),
  history: async (cmd) => client.history(cmd.channel, cmd.options || {}),
  state: async () => client.state,
  exit: async () => { client.disconnect(); setTimeout(() => process.exit(0), 50); return null; },
};

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', async (line) => {
  if (!line.trim()) {
    return;
  }
  const cmd = JSON.parse(line);
  try {
    const result = await commands[cmd.cmd](cmd);
    out({ event: 'result', id: cmd.id, result: result === undefined ? null : result });
  } catch (error) {
    out({ event: 'result', id: cmd.id, error: { code: error.code, message: error.message } });
  }
});
lines.on('close', () => process.exit(0));
out({ event: 'ready' });
