// A scale-down drain at DRAIN_RATE (docs/server.md, Shutdown): one replica holding 2,000
// websocket clients gets SIGTERM with DRAIN_SECONDS=30 and DRAIN_RATE=250. Every client must be
// disconnected, the server must exit 0, no 1-second window may see more than 1.5 × 250
// disconnects (an unpaced 5 s drain would close 500 a second), and the drain must end well
// before DRAIN_SECONDS (its length follows the sockets held, 10 s here, not the cap).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { io } = require('socket.io-client');
const h = require('./harness');

const SUITE = 'drain test (tests/js/drain.test.js)';
const missing = h.missingTools();
const skip = missing ? h.cannotRun(SUITE, missing) : false;

const CLIENTS = 2000;
const RATE = 250;
const DRAIN_SECONDS = 30;
const BATCH = 100; // clients connecting at once
const CONNECT_MS = 20000; // longest wait for one batch
const DISCONNECT_MS = 60000; // longest wait for every disconnect after the SIGTERM
const EXIT_MS = 30000; // longest wait for the exit once every client is disconnected
const LAST_WITHIN_MS = 20000; // the last disconnect, after the SIGTERM

// The most of `times` (ms, sorted) that fall in any 1-second window.
function busiestSecond(times) {
  let most = 0;
  for (let i = 0, j = 0; j < times.length; j++) {
    while (times[j] - times[i] >= 1000) i++;
    most = Math.max(most, j - i + 1);
  }
  return most;
}

test('a drain closes at most DRAIN_RATE connections a second, over as long as that needs', { skip, timeout: 240000 }, async (t) => {
  const sockets = [];
  t.after(async () => {
    for (const s of sockets) s.close();
    await h.stopAll();
  });
  const server = await h.startServer('drain', {
    DRAIN_SECONDS: String(DRAIN_SECONDS), DRAIN_RATE: String(RATE),
  });

  // The moment (ms after the SIGTERM) each client saw its disconnect, and why.
  let signalledAt = null;
  const ends = [];
  for (let i = 0; i < CLIENTS; i += BATCH) {
    const batch = [];
    for (let k = i; k < Math.min(i + BATCH, CLIENTS); k++) {
      const s = io(server.url, { transports: ['websocket'], reconnection: false, forceNew: true });
      sockets.push(s);
      batch.push(h.once(s, 'connect', CONNECT_MS));
      s.once('disconnect', (reason) => ends.push({ at: performance.now() - (signalledAt ?? Infinity), reason }));
    }
    await Promise.all(batch);
  }
  assert.equal(sockets.filter((s) => s.connected).length, CLIENTS, 'every client connected');
  assert.equal(ends.length, 0, 'no client was disconnected before the SIGTERM');

  let exit = null;
  server.child.exited.then((e) => { exit = e; });
  signalledAt = performance.now();
  server.child.kill('SIGTERM');
  await h.until('every client disconnected', DISCONNECT_MS, () => ends.length === CLIENTS)
    .catch((err) => assert.fail(`${err.message}: ${ends.length} of ${CLIENTS} were`));
  await h.until('the server exited', EXIT_MS, () => exit !== null);
  assert.deepEqual(exit, { code: 0, signal: null }, 'the server exits 0 after its drain');

  const times = ends.map((e) => e.at).sort((a, b) => a - b);
  const busiest = busiestSecond(times);
  const first = times[0];
  const last = times[times.length - 1];
  const reasons = {};
  for (const e of ends) reasons[e.reason] = (reasons[e.reason] || 0) + 1;
  t.diagnostic(`disconnects: first ${Math.round(first)} ms, last ${Math.round(last)} ms after the SIGTERM; ` +
    `busiest 1-s window ${busiest}; reasons ${JSON.stringify(reasons)}`);
  assert.ok(busiest <= 1.5 * RATE,
    `${busiest} disconnects in one second, more than 1.5 × DRAIN_RATE (${RATE})`);
  assert.ok(last < LAST_WITHIN_MS,
    `the last disconnect came ${Math.round(last)} ms after the SIGTERM: the drain took DRAIN_SECONDS, not what ${CLIENTS} sockets at ${RATE} a second need`);
});
