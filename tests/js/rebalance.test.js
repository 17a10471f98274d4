// Rebalancing (issue 21): helper clients (socket.io-client 4 and 2, websocket and
// long-polling) on two replicas behind a proxy that behaves like a Kubernetes Service
// (tests/js/service.js), while a publisher sends; a third replica is added. Every replica must
// end within REBALANCE_TOLERANCE of the mean, with at most 1.5 times the minimum of sockets
// moved (the fewest moves that bring every replica within the tolerance), no more moves once balanced, and every client holding every acknowledged message of
// its room once and in order. Once with a Service that spreads new connections, once with
// ClientIP affinity (a client's reconnects go back to the same replica for a window).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { io } = require('socket.io-client');
const ioV2 = require('socket.io-client-v2');
const h = require('./harness');
const { startService } = require('./service');
const Chorus = require(path.resolve(__dirname, '../../clients/js/chorus.js'));

const SUITE = 'rebalance test (tests/js/rebalance.test.js)';
const missing = h.missingTools();
const skip = missing ? h.cannotRun(SUITE, missing) : false;

const ROOMS = ['r0', 'r1', 'r2', 'r3'];
const TOLERANCE = 0.2;
// Faster than the default (0.005) so that a test run takes a minute, not ten.
const RATE = '0.05';
const PUBLISH_EVERY = 100; // ms
const BALANCE_MS = 120000; // longest wait for the replicas to balance
const STILL_MS = 12000; // once balanced, no more moves for this long (a round's cool-down and more)

const retry = { reconnectionDelay: 200, reconnectionDelayMax: 2000, timeout: 5000 };
const KINDS = [
  { name: 'v4 websocket', connect: (url, q) => io(url, { ...retry, forceNew: true, transports: ['websocket'], query: q }) },
  { name: 'v4 polling', connect: (url, q) => io(url, { ...retry, forceNew: true, transports: ['polling'], query: q }) },
  { name: 'v2 websocket', connect: (url, q) => ioV2(url, { ...retry, forceNew: true, transports: ['websocket'], query: q }) },
  { name: 'v2 polling', connect: (url, q) => ioV2(url, { ...retry, forceNew: true, transports: ['polling'], query: q }) },
];

async function scrape(server) {
  const res = await fetch(`${server.url}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  const m = /^chorus_rebalance_closes_total (\S+)/m.exec(text);
  return m ? Number(m[1]) : null;
}

async function counts(server) {
  const r = await h.api(server.url, 'GET', '/v1/nodes');
  assert.equal(r.status, 200, `GET /v1/nodes: ${JSON.stringify(r.body)}`);
  return r.body;
}

async function scenario(t, { clients: N, affinityMs }) {
  const sockets = [];
  let service;
  let publishing = true;
  t.after(async () => {
    publishing = false;
    for (const s of sockets) s.close();
    if (service) await service.close();
    await h.stopAll();
  });
  const redis = await h.startRedis();
  service = await startService({ affinityMs });
  const env = {
    REDIS_URL: redis.url, HISTORY_SIZE: '2000', REBALANCE_RATE: RATE,
    REBALANCE_TOLERANCE: String(TOLERANCE),
    REBALANCE_AFFINITY_SECONDS: String(Math.ceil(affinityMs / 1000)),
  };
  const replicas = [await h.startServer('rb-1', env), await h.startServer('rb-2', env)];
  service.setBackends(replicas.map((r) => r.port));

  const clients = [];
  for (let i = 0; i < N; i++) {
    const kind = KINDS[i % KINDS.length];
    const socket = kind.connect(service.url, { client: `c${i}` });
    sockets.push(socket);
    const chorus = Chorus.wrap(socket, { timeout: 15000, retryMin: 200, retryMax: 2000 });
    const c = { i, kind: kind.name, room: ROOMS[i % ROOMS.length], chorus, got: [], rawIds: new Set(), rawDups: 0, gaps: 0, errors: [] };
    socket.on('m', (data, meta) => {
      if (!meta || !meta.id) return;
      if (c.rawIds.has(meta.id)) c.rawDups += 1; else c.rawIds.add(meta.id);
    });
    // Told to move twice before it reconnected: the server picked a socket it had already shed.
    c.told = 0; c.toldTwice = 0;
    socket.on('connect', () => { c.told = 0; });
    socket.on('chorus:rebalance', () => { c.told += 1; if (c.told > 1) c.toldTwice += 1; });
    chorus.on('m', (data) => c.got.push(data.n));
    chorus.on('gap', () => { c.gaps += 1; });
    chorus.on('error', (err) => c.errors.push(err.code));
    clients.push(c);
  }
  // Joined a few at a time: 600 handshakes at once would be a storm of their own.
  for (let i = 0; i < clients.length; i += 50) {
    await Promise.all(clients.slice(i, i + 50).map((c) => c.chorus.join(c.room)));
  }
  const before = await counts(replicas[0]);
  assert.equal(before.sockets, N, `every client connected: ${JSON.stringify(before)}`);

  // One publisher over HTTP, through the replicas in turn; what was acknowledged, per room.
  const acked = new Map(ROOMS.map((r) => [r, []]));
  let n = 0;
  const publisher = (async () => {
    while (publishing) {
      n += 1;
      const room = ROOMS[n % ROOMS.length];
      const target = replicas[n % replicas.length];
      try {
        const r = await h.api(target.url, 'POST', '/v1/broadcast', { rooms: [room], event: 'm', data: { n } });
        if (r.status === 202) acked.get(room).push(n);
      } catch { /* not acknowledged: not required */ }
      await h.sleep(PUBLISH_EVERY);
    }
  })();

  replicas.push(await h.startServer('rb-3', env));
  service.setBackends(replicas.map((r) => r.port));
  const addedAt = Date.now();

  const mean = N / replicas.length;
  // Within the tolerance of the mean of what the replicas hold now (a client reconnecting
  // for a reason of its own is in nobody's count for a moment).
  const balanced = (c) => {
    const m = c.sockets / replicas.length;
    return c.nodes.length === replicas.length && c.sockets >= N - 5
      && c.nodes.every((x) => x.sockets <= (1 + TOLERANCE) * m && x.sockets >= (1 - TOLERANCE) * m);
  };
  const movedNow = async () => (await Promise.all(replicas.map(scrape))).reduce((s, v) => s + v, 0);
  let last;
  await h.until(`replicas within ${TOLERANCE} of the mean ${mean}`, BALANCE_MS, async () => {
    last = await counts(replicas[0]);
    return balanced(last);
  }).catch((e) => { throw new Error(`${e.message}; last ${JSON.stringify(last)}`); });
  const balancedAfter = Date.now() - addedAt;
  // The last round's last sockets may still go out: settled once no close for 3 s.
  let movedAtBalance = await movedNow();
  let stableSince = Date.now();
  await h.until('shedding stopped', 60000, async () => {
    const m = await movedNow();
    if (m !== movedAtBalance) { movedAtBalance = m; stableSince = Date.now(); }
    return Date.now() - stableSince >= 3000;
  });
  await h.sleep(STILL_MS); // no sleep-then-assert on an event: this checks that nothing happens
  const after = await counts(replicas[0]);
  const moved = (await Promise.all(replicas.map(scrape))).reduce((s, v) => s + v, 0);

  publishing = false;
  await publisher;
  const need = (c) => acked.get(c.room);
  await h.until('every client holds every acknowledged message of its room', 60000,
    () => clients.every((c) => need(c).every((x) => c.got.includes(x))));

  const problems = [];
  // The fewest moves that bring every replica within the tolerance: the old ones' sockets above
  // the band, or what the new one needs to reach it, whichever is more.
  const aboveBand = before.nodes.reduce((s, x) => s + Math.max(0, x.sockets - Math.floor((1 + TOLERANCE) * mean)), 0);
  const minimum = Math.max(aboveBand, Math.ceil((1 - TOLERANCE) * mean));
  if (!balanced(after)) problems.push(`not balanced ${STILL_MS} ms after balancing: ${JSON.stringify(after)}`);
  if (moved !== movedAtBalance) problems.push(`sockets kept moving once balanced: ${movedAtBalance} then ${moved}`);
  if (!(moved >= minimum && moved <= 1.5 * minimum)) problems.push(`moved ${moved} sockets; the minimum is ${minimum}, at most 1.5 times that allowed`);
  for (const c of clients) {
    const want = need(c);
    const seen = new Set();
    const dups = c.got.filter((x) => { const d = seen.has(x); seen.add(x); return d; });
    const order = c.got.some((x, k) => k > 0 && x < c.got[k - 1]);
    const p = [];
    if (dups.length) p.push(`duplicated ${dups.length}`);
    if (c.rawDups) p.push(`${c.rawDups} copies reached the socket twice`);
    if (order) p.push('out of order');
    if (c.gaps) p.push(`${c.gaps} gaps`);
    if (c.toldTwice) p.push(`told chorus:rebalance again ${c.toldTwice} times before reconnecting`);
    if (c.errors.length) p.push(`errors ${c.errors.slice(0, 3).join(',')}`);
    if (p.length) problems.push(`client ${c.i} (${c.kind}): ${p.join('; ')}`);
  }
  const report = `before ${JSON.stringify(before.nodes)}, balanced after ${balancedAfter} ms: ${JSON.stringify(after.nodes)}; ` +
    `moved ${moved} (minimum ${minimum}); ${n} sent, ${[...acked.values()].reduce((s, a) => s + a.length, 0)} acked; proxy ${JSON.stringify(service.stats)}`;
  console.log(`rebalance (${affinityMs ? `affinity ${affinityMs} ms` : 'spread'}): ${report}`);
  assert.ok(problems.length === 0, `${problems.length} problem(s):\n  ${problems.slice(0, 30).join('\n  ')}\n  ${report}`);
}

test('a third replica gets its share: 600 clients behind a Service that spreads connections', { skip, timeout: 300000 }, async (t) => {
  await scenario(t, { clients: 600, affinityMs: 0 });
});

test('a third replica gets its share behind ClientIP affinity: shed clients wait out the window', { skip, timeout: 300000 }, async (t) => {
  await scenario(t, { clients: 300, affinityMs: 3000 });
});
