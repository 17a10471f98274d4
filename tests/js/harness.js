// Starts a real redis-server and chorus-server processes on free loopback ports,
// and stops exactly the processes it started.
'use strict';

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');

const BIN = process.env.CHORUS_SERVER_BIN ||
  path.resolve(__dirname, '../../target/debug/chorus-server');
const started = new Set();

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// Why this suite cannot run here (redis-server or the server binary missing), or null.
function missingTools() {
  const onPath = (tool) => (process.env.PATH || '').split(path.delimiter)
    .some((dir) => { try { fs.accessSync(path.join(dir, tool), fs.constants.X_OK); return true; } catch { return false; } });
  const missing = [];
  if (!onPath('redis-server')) missing.push('redis-server not found on PATH');
  try { fs.accessSync(BIN, fs.constants.X_OK); } catch { missing.push(`${BIN} not found (set CHORUS_SERVER_BIN)`); }
  return missing.length ? missing.join('; ') : null;
}

// As scripts/suite.sh does: under CI=true a suite that cannot run fails with one line saying
// why (nothing may pass by not running); elsewhere it is skipped, and the skip is written to
// $CHORUS_SKIP_LOG (if set) so scripts/test.sh lists it at the end. Returns the skip reason.
function cannotRun(suite, reason) {
  if (process.env.CI === 'true') {
    const line = `FAILED: ${suite} cannot run under CI=true: ${reason}`;
    console.error(line);
    throw new Error(line);
  }
  console.error(`SKIPPED: ${suite}: ${reason}`);
  if (process.env.CHORUS_SKIP_LOG) fs.appendFileSync(process.env.CHORUS_SKIP_LOG, `${suite}: ${reason}\n`);
  return reason;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, limitMs, check) {
  const deadline = Date.now() + limitMs;
  while (Date.now() < deadline) {
    try { if (await check()) return; } catch { /* not yet */ }
    await sleep(50);
  }
  throw new Error(`${what}: not within ${limitMs} ms`);
}

function track(child) {
  started.add(child);
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    started.delete(child);
    resolve({ code, signal });
  }));
  return child;
}

async function startRedis() {
  const port = await freePort();
  const child = track(spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1',
    '--save', '', '--appendonly', 'no', '--loglevel', 'warning'], { stdio: 'ignore' }));
  await until('redis listening', 10000, () => new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => { s.end(); resolve(true); });
    s.on('error', () => resolve(false));
  }));
  return { port, url: `redis://127.0.0.1:${port}`, child };
}

// `env.PORT` restarts a replica on the port it had (clients reconnect to the same URL).
async function startServer(name, env = {}) {
  const port = env.PORT ? Number(env.PORT) : await freePort();
  const logPath = path.join(os.tmpdir(), `chorus-js-${name}-${port}.log`);
  const log = fs.openSync(logPath, 'w');
  const child = track(spawn(BIN, [], {
    env: { PATH: process.env.PATH, PORT: String(port), POD_NAME: name, DRAIN_SECONDS: '0', ...env },
    stdio: ['ignore', 'ignore', log],
  }));
  const url = `http://127.0.0.1:${port}`;
  await until(`${name} ready`, 20000, async () => (await fetch(`${url}/readyz`)).status === 200);
  return { name, port, url, child, logPath };
}

async function startCluster(n, env = {}) {
  const redis = await startRedis();
  const servers = [];
  for (let i = 0; i < n; i++) {
    servers.push(await startServer(`node-${i}`, { REDIS_URL: redis.url, ...env }));
  }
  return { redis, servers };
}

async function stopAll() {
  const children = [...started];
  for (const c of children) c.kill('SIGKILL');
  await Promise.all(children.map((c) => c.exited));
}

async function api(base, method, pathname, body, token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(`${base}${pathname}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15000),
  });
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { json = text; }
  return { status: res.status, body: json };
}

// Collects every event a client receives; `next` waits (bounded) for the next one.
function recorder(socket) {
  const queue = [];
  const waiters = [];
  socket.onAny((event, ...args) => {
    const item = { event, args };
    const w = waiters.shift();
    if (w) w(item); else queue.push(item);
  });
  return {
    next(ms = 5000) {
      if (queue.length) return Promise.resolve(queue.shift());
      return new Promise((resolve) => {
        const timer = setTimeout(() => {
          const i = waiters.indexOf(done);
          if (i >= 0) waiters.splice(i, 1);
          resolve(null);
        }, ms);
        const done = (item) => { clearTimeout(timer); resolve(item); };
        waiters.push(done);
      });
    },
    pending: () => queue.length,
  };
}

function once(socket, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    socket.once(event, (...args) => { clearTimeout(timer); resolve(args); });
  });
}

function ack(socket, event, data, ms = 5000) {
  return socket.timeout(ms).emitWithAck(event, data);
}

// What clients see of room history (HISTORY_SIZE, on by default).
const nonEmptyString = (value, what) => {
  assert.equal(typeof value, 'string', `${what}: ${JSON.stringify(value)}`);
  assert.ok(value.length > 0, `${what} is empty`);
};

// A successful `join` ack: with history on `{ok: true, offset}` (an opaque, non-empty string,
// where the socket starts receiving), with history off `{ok: true}`. Returns the offset.
function assertJoined(reply, { history = true, what = 'join ack' } = {}) {
  if (!history) {
    assert.deepEqual(reply, { ok: true }, what);
    return undefined;
  }
  assert.ok(reply && typeof reply === 'object', `${what}: ${JSON.stringify(reply)}`);
  nonEmptyString(reply.offset, `${what} offset`);
  assert.deepEqual(reply, { ok: true, offset: reply.offset }, what);
  return reply.offset;
}

// A successful `publish` ack: `{ok: true, id}` with the message's id (32 hex digits). Returns it.
function assertPublished(reply, what = 'publish ack') {
  assert.ok(reply && typeof reply === 'object', `${what}: ${JSON.stringify(reply)}`);
  assert.match(String(reply.id), /^[0-9a-f]{32}$/, `${what} id`);
  assert.deepEqual(reply, { ok: true, id: reply.id }, what);
  return reply.id;
}

// The arguments a room message arrives with while history is on: the data, then
// `{id, offset}` (when `id` is given, the id must be that one: the publisher's ack's).
// Returns that last argument.
function assertRoomArgs(args, data, { id, what = 'room message' } = {}) {
  assert.ok(Array.isArray(args), `${what}: arguments ${JSON.stringify(args)}`);
  assert.equal(args.length, 2, `${what}: arguments ${JSON.stringify(args)}`);
  assert.deepEqual(args[0], data, `${what} data`);
  const meta = args[1];
  assert.ok(meta && typeof meta === 'object', `${what}: last argument ${JSON.stringify(meta)}`);
  assert.deepEqual(Object.keys(meta).sort(), ['id', 'offset'], `${what}: last argument ${JSON.stringify(meta)}`);
  nonEmptyString(meta.id, `${what} id`);
  nonEmptyString(meta.offset, `${what} offset`);
  if (id !== undefined) assert.equal(meta.id, id, `${what} id is the publish ack's`);
  return meta;
}

// The same for an item of `recorder`: the event's name, then its arguments as above.
function assertRoomMessage(got, event, data, opts = {}) {
  const what = opts.what || event;
  assert.ok(got, `${what}: nothing arrived`);
  assert.equal(got.event, event, `${what}: event ${JSON.stringify(got)}`);
  return assertRoomArgs(got.args, data, { ...opts, what });
}

module.exports = {
  missingTools, cannotRun, startRedis, startServer, startCluster, stopAll, api, recorder, once, ack, sleep, until, freePort,
  assertJoined, assertPublished, assertRoomArgs, assertRoomMessage,
};
