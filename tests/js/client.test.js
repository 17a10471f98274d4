// The client helper (clients/js/chorus.js, served at /client/chorus.js) wrapping real
// socket.io-client 4 (websocket) and 2 (long-polling, as sails.io.js uses it) sockets, against
// real chorus-server replicas on one real Redis: promises and refusals, message meta, a replica
// killed or drained and restarted while another one publishes, a gap, a server-side disconnect,
// and a refused token.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { io } = require('socket.io-client');
const ioV2 = require('socket.io-client-v2');
const jwt = require('jsonwebtoken');
const h = require('./harness');
const Chorus = require(path.resolve(__dirname, '../../clients/js/chorus.js'));

const SUITE = 'JavaScript client helper tests (tests/js/client.test.js)';
const missing = h.missingTools();
const skip = missing ? h.cannotRun(SUITE, missing) : false;

const QUIET = 400; // ms without a further message before "nothing more" is believed
const WAIT = 10000; // longest wait for anything expected
const KEY = 'client-test-jwt-key-0123456789abcdef';

// Both clients retry fast here so the tests stay short; the helper's own backoff after a
// server-side disconnect is shortened the same way.
const KINDS = [
  {
    name: 'v4 websocket',
    signal: 'SIGKILL', // the replica dies
    connect: (url, token) => io(url, {
      transports: ['websocket'], forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 300,
      auth: token ? { token } : undefined,
    }),
    setToken: (socket, token) => { socket.auth = { token }; },
  },
  {
    name: 'v2 long-polling',
    signal: 'SIGTERM', // the replica drains (DRAIN_SECONDS=0 in the harness)
    connect: (url, token) => ioV2(url, {
      transports: ['polling'], forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 300,
      query: token ? { token } : undefined,
    }),
    setToken: (socket, token) => { socket.io.opts.query = { token }; },
  },
];

const opened = [];
function wrapped(kind, url, token) {
  const socket = kind.connect(url, token);
  opened.push(socket);
  const chorus = Chorus.wrap(socket, { retryMin: 50, retryMax: 400, timeout: 5000 });
  return { socket, chorus };
}

// Everything a wrapped client hands the app, with waits that end as soon as a condition holds.
function watch(chorus, events) {
  const log = { msg: [], gap: [], resumed: [], error: [] };
  const waiters = new Set();
  const push = (name, item) => {
    log[name].push(item);
    for (const w of waiters) if (w.check()) w.done();
  };
  for (const event of events) chorus.on(event, (data, meta) => push('msg', { event, data, meta }));
  for (const name of ['gap', 'resumed', 'error']) chorus.on(name, (v) => push(name, v));
  log.until = (what, check, ms = WAIT) => new Promise((resolve, reject) => {
    if (check()) return resolve();
    const w = {
      check,
      done: () => { clearTimeout(timer); waiters.delete(w); resolve(); },
    };
    const timer = setTimeout(() => {
      waiters.delete(w);
      reject(new Error(`${what}: not within ${ms} ms (messages: ${log.msg.map((m) => JSON.stringify(m.data)).join(' ')})`));
    }, ms);
    waiters.add(w);
  });
  return log;
}

const ns = (log) => log.msg.map((m) => m.data.n);
const range = (from, to) => Array.from({ length: to - from }, (_, i) => from + i);

async function broadcast(server, room, n) {
  const r = await h.api(server.url, 'POST', '/v1/broadcast', { rooms: [room], event: 'msg', data: { n } });
  assert.equal(r.status, 202, JSON.stringify(r.body));
}

async function connected(socket) {
  if (!socket.connected) await h.once(socket, 'connect', WAIT);
}

async function restart(server, signal, env) {
  server.child.kill(signal);
  await server.child.exited;
  return () => h.startServer(`${server.name}-again`, { ...env, PORT: String(server.port) });
}

test.after(async () => {
  for (const s of opened) s.close();
  await h.stopAll();
});

for (const kind of KINDS) {
  test(`${kind.name}: join, leave and publish are promises; refusals reject with .code`, { skip }, async () => {
    const redis = await h.startRedis();
    const server = await h.startServer('promises', { REDIS_URL: redis.url });
    const { socket, chorus } = wrapped(kind, server.url);
    const joined = await chorus.join('c-room'); // sent once the socket connects
    assert.equal(joined.ok, true);
    assert.equal(typeof joined.offset, 'string');
    assert.equal(chorus.offset, joined.offset);
    assert.deepEqual(chorus.rooms, ['c-room']);
    await connected(socket);

    await assert.rejects(chorus.join(''), (e) => e.code === 'invalid_request' && e.ack.ok === false && e.message.length > 0);
    await assert.rejects(chorus.publish('c-room', 'connect', {}), (e) => e.code === 'invalid_request');
    await assert.rejects(chorus.publish('c-room', 'chorus:x', {}), (e) => e.code === 'invalid_request');
    assert.deepEqual(chorus.rooms, ['c-room'], 'a refused join is not remembered');

    const published = await chorus.publish('c-room', 'msg', { n: 1 });
    assert.equal(published.ok, true);
    assert.match(published.id, /^[0-9a-f]{32}$/);

    assert.deepEqual(await chorus.leave('c-room'), { ok: true });
    assert.deepEqual(chorus.rooms, []);
  });

  test(`${kind.name}: messages come with {id, offset}, each once, the offset kept; the sender gets none`, { skip }, async () => {
    const cluster = await h.startCluster(2);
    const [a, b] = cluster.servers;
    const reader = wrapped(kind, a.url);
    const writer = wrapped(kind, b.url);
    const log = watch(reader.chorus, ['msg']);
    const own = watch(writer.chorus, ['msg']);
    await reader.chorus.join('m-room');
    await writer.chorus.join('m-room');
    const ids = [];
    for (let n = 0; n < 5; n++) ids.push((await writer.chorus.publish('m-room', 'msg', { n })).id);
    await log.until('5 messages', () => log.msg.length >= 5);
    assert.deepEqual(ns(log), range(0, 5));
    assert.deepEqual(log.msg.map((m) => m.meta.id), ids);
    for (const m of log.msg) assert.equal(typeof m.meta.offset, 'string');
    assert.equal(reader.chorus.offset, log.msg[4].meta.offset);

    // A broadcast to every socket has no meta and is passed on as it is.
    const r = await h.api(b.url, 'POST', '/v1/broadcast', { event: 'msg', data: { n: 'all' } });
    assert.equal(r.status, 202);
    await log.until('the broadcast to everyone', () => log.msg.length === 6);
    assert.deepEqual(log.msg[5].data, { n: 'all' });
    assert.equal(log.msg[5].meta, undefined);
    await own.until('the broadcast to everyone (writer)', () => own.msg.length === 1);

    await h.sleep(QUIET);
    assert.equal(log.msg.length, 6);
    assert.deepEqual(own.msg.map((m) => m.data), [{ n: 'all' }], 'the writer does not get its own messages');
    assert.deepEqual([...log.gap, ...log.resumed, ...log.error], []);
  });

  test(`${kind.name}: its replica ${kind.signal === 'SIGKILL' ? 'killed' : 'drained'} and restarted while another publishes: every message once, in order`, { skip }, async () => {
    const cluster = await h.startCluster(2);
    const [a, b] = cluster.servers;
    const { socket, chorus } = wrapped(kind, a.url);
    const log = watch(chorus, ['msg']);
    await chorus.join('r-room');
    let n = 0;
    for (; n < 10; n++) await broadcast(b, 'r-room', n);
    await log.until('the first 10', () => log.msg.length === 10);

    const lost = h.once(socket, 'disconnect', WAIT);
    const startAgain = await restart(a, kind.signal, { REDIS_URL: cluster.redis.url });
    await lost;
    for (; n < 20; n++) await broadcast(b, 'r-room', n); // missed while its replica is down
    // From here a publisher runs alongside the restart and the client's reconnect, so that
    // messages land before, during and after the resume: until 10 after it, at most 80 in
    // all (fewer than HISTORY_SIZE keeps), paced so that the restart does not exhaust them.
    let resumedAt = null;
    const publisher = (async () => {
      while (n < 80 && (resumedAt === null || n < resumedAt + 10)) {
        await broadcast(b, 'r-room', n++);
        await h.sleep(5);
      }
    })();
    await startAgain();
    await log.until('resumed', () => log.resumed.length === 1);
    resumedAt = n;
    await publisher;
    const end = n;
    if (process.env.CHORUS_TEST_DEBUG) console.error(`${kind.name}: ${end} published, ${resumedAt} by the resume`);

    await log.until(`all ${end} messages`, () => log.msg.length >= end);
    await h.sleep(QUIET);
    assert.deepEqual(ns(log), range(0, end), 'every message exactly once, in order');
    assert.equal(new Set(log.msg.map((m) => m.meta.id)).size, end);
    assert.deepEqual(log.resumed, [{ rooms: ['r-room'], recovered: true, offset: log.resumed[0].offset }]);
    assert.deepEqual(log.gap, []);
    assert.deepEqual(log.error, []);
    assert.equal(chorus.offset, log.msg[end - 1].meta.offset);
  });

  test(`${kind.name}: more missed than HISTORY_SIZE keeps: a gap, then the newest kept, then live`, { skip }, async () => {
    const cluster = await h.startCluster(2, { HISTORY_SIZE: '5' });
    const [a, b] = cluster.servers;
    const { socket, chorus } = wrapped(kind, a.url);
    const log = watch(chorus, ['msg']);
    await chorus.join('g-room');
    await broadcast(b, 'g-room', 0);
    await broadcast(b, 'g-room', 1);
    await log.until('the first 2', () => log.msg.length === 2);

    const lost = h.once(socket, 'disconnect', WAIT);
    const startAgain = await restart(a, kind.signal, { REDIS_URL: cluster.redis.url, HISTORY_SIZE: '5' });
    await lost;
    for (let n = 2; n < 22; n++) await broadcast(b, 'g-room', n);
    await startAgain();
    await log.until('resumed', () => log.resumed.length === 1);
    assert.deepEqual(log.gap, [{ rooms: ['g-room'] }]);
    assert.equal(log.resumed[0].recovered, false);
    assert.deepEqual(ns(log), [0, 1, 17, 18, 19, 20, 21], 'the 5 messages the history kept, after the 2 seen');

    await broadcast(b, 'g-room', 22);
    await log.until('a live message', () => log.msg.length === 8);
    await h.sleep(QUIET);
    assert.deepEqual(ns(log), [0, 1, 17, 18, 19, 20, 21, 22]);
    assert.equal(log.gap.length, 1);
  });

  test(`${kind.name}: disconnected by the server: the helper reconnects, resumes, and drops its own messages from the replay`, { skip }, async () => {
    const cluster = await h.startCluster(2);
    const [a, b] = cluster.servers;
    const { socket, chorus } = wrapped(kind, a.url);
    const log = watch(chorus, ['msg']);
    // What reaches the socket itself, under the helper: shows that the replay did hold the
    // client's own messages, and that the helper is what dropped them.
    const raw = [];
    socket.on('msg', (data, meta) => raw.push(meta.id));
    await chorus.join('o-room');
    await connected(socket);
    const mine = [];
    for (let n = 0; n < 3; n++) mine.push((await chorus.publish('o-room', 'msg', { n, mine: true })).id);

    const oldId = socket.id;
    const lost = h.once(socket, 'disconnect', WAIT);
    const r = await h.api(b.url, 'POST', `/v1/sockets/${encodeURIComponent(oldId)}/disconnect`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal((await lost)[0], 'io server disconnect');
    for (let n = 3; n < 6; n++) await broadcast(b, 'o-room', n);
    await log.until('resumed', () => log.resumed.length === 1);
    assert.notEqual(socket.id, oldId);
    await log.until('the 3 others', () => log.msg.length === 3);
    await broadcast(b, 'o-room', 6);
    await log.until('a live one', () => log.msg.length === 4);
    await h.sleep(QUIET);

    assert.deepEqual(ns(log), [3, 4, 5, 6], 'own messages are not handed to the app');
    assert.deepEqual(raw.slice(0, 3), mine, 'the replay held the own messages');
    assert.equal(log.resumed[0].recovered, true);
    assert.deepEqual([...log.gap, ...log.error], []);
  });

  test(`${kind.name}: a refused token after a server disconnect: one "unauthorized", no retry loop; a fresh token resumes`, { skip }, async () => {
    const redis = await h.startRedis();
    const server = await h.startServer('jwt', { REDIS_URL: redis.url, JWT_SECRET: KEY });
    const sign = () => jwt.sign({ sub: 'u', rooms: ['*'], publish: ['*'] }, KEY, { algorithm: 'HS256', expiresIn: 600 });
    const { socket, chorus } = wrapped(kind, server.url, sign());
    const log = watch(chorus, ['msg']);
    await chorus.join('t-room');
    await connected(socket);

    let attempts = 0;
    socket.io.on('reconnect_attempt', () => { attempts += 1; });
    socket.on('connect_error', () => { attempts += 1; });
    kind.setToken(socket, 'not-a-token');
    const r = await h.api(server.url, 'POST', `/v1/sockets/${encodeURIComponent(socket.id)}/disconnect`);
    assert.equal(r.status, 200);
    await log.until('the unauthorized error', () => log.error.length === 1);
    assert.equal(log.error[0].code, 'unauthorized');
    await h.sleep(1000); // longer than the helper's and the client's retry delays here
    assert.equal(log.error.length, 1, 'no second attempt with the refused token');
    assert.ok(attempts <= 1, `${attempts} connection attempts after the refusal`);
    assert.equal(socket.connected, false);

    // The app gets a fresh token and connects again: rooms and messages come back.
    await broadcast(server, 't-room', 1); // missed meanwhile
    kind.setToken(socket, sign());
    socket.connect();
    await log.until('resumed', () => log.resumed.length === 1);
    await log.until('the missed message', () => log.msg.length === 1);
    assert.deepEqual(ns(log), [1]);
    assert.equal(log.resumed[0].recovered, true);
  });
}

test('HISTORY_SIZE=0: no meta, no offset, and every resume reports a gap', { skip }, async () => {
  const redis = await h.startRedis();
  const server = await h.startServer('nohistory', { REDIS_URL: redis.url, HISTORY_SIZE: '0' });
  const { socket, chorus } = wrapped(KINDS[0], server.url);
  const log = watch(chorus, ['msg']);
  assert.deepEqual(await chorus.join('n-room'), { ok: true });
  await connected(socket);
  await broadcast(server, 'n-room', 0);
  await log.until('a message', () => log.msg.length === 1);
  assert.equal(log.msg[0].meta, undefined);
  assert.equal(chorus.offset, null);
  const r = await h.api(server.url, 'POST', `/v1/sockets/${encodeURIComponent(socket.id)}/disconnect`);
  assert.equal(r.status, 200);
  await log.until('resumed', () => log.resumed.length === 1);
  assert.deepEqual(log.resumed, [{ rooms: ['n-room'], recovered: false, offset: null }]);
  assert.deepEqual(log.gap, [{ rooms: ['n-room'] }]);
  await broadcast(server, 'n-room', 1);
  await log.until('a live message after the resume', () => log.msg.length === 2);
});
