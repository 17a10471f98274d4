// socket.io-client v4 (what browsers run) against three replicas on one Redis.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { io } = require('socket.io-client');
const h = require('./harness');

const QUIET = 400;
let cluster;
const sockets = [];

function connect(url, opts = {}) {
  const s = io(url, { transports: ['websocket'], reconnection: false, forceNew: true, ...opts });
  sockets.push(s);
  return s;
}

test.before(async () => { cluster = await h.startCluster(3); });
test.after(async () => { for (const s of sockets) s.close(); await h.stopAll(); });

test('publish reaches every other member on every replica once, not the sender', async () => {
  const clients = [];
  for (let i = 0; i < 6; i++) {
    const s = connect(cluster.servers[i % 3].url);
    await h.once(s, 'connect');
    h.assertJoined(await h.ack(s, 'join', 'js-chat'));
    clients.push({ s, rec: h.recorder(s) });
  }
  const ids = new Set();
  for (let n = 0; n < clients.length; n++) {
    const reply = await h.ack(clients[n].s, 'publish', { room: 'js-chat', event: 'msg', data: { n, nested: [1, { x: 'y' }] } });
    const id = h.assertPublished(reply);
    ids.add(id);
    const offsets = new Set();
    for (let i = 0; i < clients.length; i++) {
      if (i === n) continue;
      const got = await clients[i].rec.next();
      const meta = h.assertRoomMessage(got, 'msg', { n, nested: [1, { x: 'y' }] }, { id, what: `client ${i}` });
      offsets.add(meta.offset);
    }
    assert.equal(offsets.size, 1, `every member got message ${n} at one offset: ${[...offsets]}`);
  }
  assert.equal(ids.size, clients.length, 'each publish has its own id');
  assert.deepEqual(await Promise.all(clients.map((c) => c.rec.next(QUIET))), clients.map(() => null));
});

test('HTTP broadcast: union of rooms once per socket, except honoured, any replica', async () => {
  // Socket i sits in rooms by the bits of i: 1 -> a, 2 -> b.
  const clients = [];
  for (let i = 0; i < 8; i++) {
    const s = connect(cluster.servers[i % 3].url);
    await h.once(s, 'connect');
    if (i & 1) await h.ack(s, 'join', 'js-a');
    if (i & 2) await h.ack(s, 'join', 'js-b');
    clients.push({ s, rec: h.recorder(s) });
  }
  const excluded = clients[3].s.id;
  for (let via = 0; via < 3; via++) {
    const r = await h.api(cluster.servers[via].url, 'POST', '/v1/broadcast',
      { rooms: ['js-a', 'js-b'], event: 'news', data: { via }, except: [excluded] });
    assert.deepEqual(r, { status: 202, body: { ok: true } });
    const metas = [];
    for (let i = 0; i < clients.length; i++) {
      if ((i & 3) && i !== 3) metas.push(h.assertRoomMessage(await clients[i].rec.next(), 'news', { via }, { what: `socket ${i}` }));
    }
    // One message: every socket sees the same id and offset, whichever rooms brought it.
    assert.deepEqual(metas, metas.map(() => metas[0]));
    assert.deepEqual(await Promise.all(clients.map((c) => c.rec.next(QUIET))), clients.map(() => null));
  }
  // Without rooms a broadcast reaches every socket with its data alone.
  const r = await h.api(cluster.servers[1].url, 'POST', '/v1/broadcast', { event: 'all', data: { every: true } });
  assert.deepEqual(r, { status: 202, body: { ok: true } });
  for (let i = 0; i < clients.length; i++) {
    assert.deepEqual(await clients[i].rec.next(), { event: 'all', args: [{ every: true }] }, `socket ${i}`);
  }
  assert.deepEqual(await Promise.all(clients.map((c) => c.rec.next(QUIET))), clients.map(() => null));
});

test('membership added over HTTP is in place when the answer comes', async () => {
  const s = connect(cluster.servers[2].url);
  await h.once(s, 'connect');
  const rec = h.recorder(s);
  for (let round = 0; round < 20; round++) {
    const room = `js-late-${round}`;
    const join = await h.api(cluster.servers[round % 3].url, 'POST', `/v1/rooms/${room}/members`, { sockets: [s.id] });
    assert.equal(join.status, 200, JSON.stringify(join.body));
    await h.api(cluster.servers[(round + 1) % 3].url, 'POST', '/v1/broadcast', { rooms: [room], event: 'late', data: round });
    h.assertRoomMessage(await rec.next(), 'late', round);
  }
  const list = await h.api(cluster.servers[0].url, 'GET', '/v1/rooms/js-late-0/sockets');
  assert.deepEqual(list.body, { room: 'js-late-0', sockets: [{ id: s.id, node: 'node-2' }] });
});

test('long-polling clients work too (sticky sessions assumed, as the Service sets)', async () => {
  const poller = connect(cluster.servers[0].url, { transports: ['polling'] });
  await h.once(poller, 'connect');
  h.assertJoined(await h.ack(poller, 'join', 'js-poll'));
  const rec = h.recorder(poller);
  const r = await h.api(cluster.servers[1].url, 'POST', '/v1/broadcast', { rooms: ['js-poll'], event: 'p', data: 'polled' });
  assert.equal(r.status, 202);
  h.assertRoomMessage(await rec.next(), 'p', 'polled');
});

test('history off (HISTORY_SIZE=0): join acks are {ok: true}, room messages carry their data alone', async () => {
  const server = await h.startServer('no-history', { HISTORY_SIZE: '0' });
  const [a, b] = [connect(server.url), connect(server.url)];
  await Promise.all([h.once(a, 'connect'), h.once(b, 'connect')]);
  for (const s of [a, b]) h.assertJoined(await h.ack(s, 'join', 'js-off'), { history: false });
  const rec = h.recorder(b);
  h.assertPublished(await h.ack(a, 'publish', { room: 'js-off', event: 'm', data: { k: 1 } }));
  assert.deepEqual(await rec.next(), { event: 'm', args: [{ k: 1 }] });
  const r = await h.api(server.url, 'POST', '/v1/broadcast', { rooms: ['js-off'], event: 'n', data: 'two' });
  assert.equal(r.status, 202);
  assert.deepEqual(await rec.next(), { event: 'n', args: ['two'] });
  assert.equal(await rec.next(QUIET), null);
});
