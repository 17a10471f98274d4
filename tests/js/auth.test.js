// JWT connection auth with socket.io-client v4, across two replicas.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { io } = require('socket.io-client');
const jwt = require('jsonwebtoken');
const h = require('./harness');

const KEY = 'js-test-jwt-key-0123456789abcdef';
const TOKEN = 'js-api-token';
let cluster;
const sockets = [];

function connect(url, auth) {
  const s = io(url, { transports: ['websocket'], reconnection: false, forceNew: true, auth });
  sockets.push(s);
  return s;
}
const sign = (claims, key = KEY) => jwt.sign(claims, key, { algorithm: 'HS256', expiresIn: 600 });

test.before(async () => {
  cluster = await h.startCluster(2, { JWT_SECRET: KEY, API_TOKEN: TOKEN, PUBLIC_ROOMS: 'lobby' });
});
test.after(async () => { for (const s of sockets) s.close(); await h.stopAll(); });

test('missing, expired and badly signed tokens get connect_error "unauthorized"', async () => {
  const expired = jwt.sign({ sub: 'x', exp: Math.floor(Date.now() / 1000) - 3600 }, KEY, { algorithm: 'HS256' });
  for (const auth of [undefined, {}, { token: 'nope' }, { token: expired }, { token: sign({ sub: 'x' }, 'wrong-key') }]) {
    const s = connect(cluster.servers[0].url, auth);
    const [err] = await h.once(s, 'connect_error');
    assert.equal(err.message, 'unauthorized', JSON.stringify(auth));
  }
});

test('claims decide joins and publishes; user:<sub> is joined automatically', async () => {
  const alice = connect(cluster.servers[0].url, { token: sign({ sub: 'alice', rooms: ['team:*'], publish: ['team:red'] }) });
  const bob = connect(cluster.servers[1].url, { token: sign({ sub: 'bob', rooms: ['team:red'] }) });
  await Promise.all([h.once(alice, 'connect'), h.once(bob, 'connect')]);
  const bobRec = h.recorder(bob);

  const forbidden = await h.ack(bob, 'join', 'team:blue');
  assert.equal(forbidden.ok, false);
  assert.equal(forbidden.error, 'forbidden');
  assert.equal(typeof forbidden.message, 'string');
  h.assertJoined(await h.ack(bob, 'join', 'team:red'));
  h.assertJoined(await h.ack(bob, 'join', 'lobby'));
  assert.equal((await h.ack(bob, 'publish', { room: 'team:red', event: 'e', data: 1 })).error, 'forbidden');
  assert.equal((await h.ack(alice, 'publish', { room: 'team:blue', event: 'e', data: 1 })).error, 'forbidden');

  const id = h.assertPublished(await h.ack(alice, 'publish', { room: 'team:red', event: 'go', data: 'now' }));
  h.assertRoomMessage(await bobRec.next(), 'go', 'now', { id });

  const dm = await h.api(cluster.servers[0].url, 'POST', '/v1/broadcast', { rooms: ['user:bob'], event: 'dm', data: 'psst' }, TOKEN);
  assert.equal(dm.status, 202);
  const dmMeta = h.assertRoomMessage(await bobRec.next(), 'dm', 'psst');
  assert.notEqual(dmMeta.id, id);
  const unauth = await h.api(cluster.servers[0].url, 'POST', '/v1/broadcast', { event: 'x' });
  assert.deepEqual(unauth.body.error, 'unauthorized');
  assert.equal(await bobRec.next(300), null);
});

test('a token that expires without a refresh ends the socket from the server; refresh replaces it', async () => {
  const url = cluster.servers[1].url;
  const now = Math.floor(Date.now() / 1000);
  const expiring = (claims) => jwt.sign(claims, KEY, { algorithm: 'HS256' });
  // A few seconds ahead, so that a busy machine still refreshes `kept` in time.
  const kept = connect(url, { token: expiring({ sub: 'kim', rooms: ['old:*'], exp: now + 6 }) });
  const dropped = connect(url, { token: expiring({ sub: 'dee', exp: now + 7 }) });
  await Promise.all([h.once(kept, 'connect'), h.once(dropped, 'connect')]);
  const droppedGone = h.once(dropped, 'disconnect', 30000);

  assert.equal((await h.ack(kept, 'refresh', { token: 'nope' })).error, 'unauthorized');
  assert.equal((await h.ack(kept, 'refresh', { token: sign({ sub: 'eve', rooms: ['*'] }) })).error, 'forbidden');
  h.assertJoined(await h.ack(kept, 'join', 'old:1'), { what: 'refused refreshes leave the old token in force' });
  assert.deepEqual(await h.ack(kept, 'refresh', { token: sign({ sub: 'kim', rooms: ['new:*'] }) }), { ok: true });
  h.assertJoined(await h.ack(kept, 'join', 'new:1'));
  assert.equal((await h.ack(kept, 'join', 'old:2')).error, 'forbidden');

  const [reason] = await droppedGone;
  assert.equal(reason, 'io server disconnect');
  // `kept`'s first token has expired by now too: the refresh moved its end.
  assert.equal(kept.connected, true);
  h.assertJoined(await h.ack(kept, 'join', 'new:2'));
});
