// socket.io-client 2.x, as bundled by sails.io.js (Engine.IO 3), and shutdown as clients see it.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const ioV2 = require('socket.io-client-v2');
const { io } = require('socket.io-client');
const h = require('./harness');

test.after(() => h.stopAll());

test('a socket.io-client 2.x socket joins and receives a broadcast from another replica', async () => {
  const cluster = await h.startCluster(2);
  for (const transports of [['websocket'], ['polling', 'websocket']]) {
    const s = ioV2(cluster.servers[0].url, { transports, reconnection: false, forceNew: true });
    try {
      await h.once(s, 'connect');
      const joined = await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no join ack')), 5000);
        s.emit('join', 'sails-room', (reply) => { clearTimeout(t); resolve(reply); });
      });
      h.assertJoined(joined, { what: `join ack over ${transports}` });
      const got = new Promise((resolve) => s.once('update', (...args) => resolve(args)));
      const r = await h.api(cluster.servers[1].url, 'POST', '/v1/broadcast', { rooms: ['sails-room'], event: 'update', data: { v: 2, transports } });
      assert.equal(r.status, 202);
      const args = await Promise.race([got, h.sleep(5000).then(() => 'timeout')]);
      h.assertRoomArgs(args, { v: 2, transports }, { what: `update over ${transports}` });
    } finally {
      s.close();
    }
  }
});

test('SIGTERM: not ready at once, sockets closed after DRAIN_SECONDS, exit code 0', async () => {
  const redis = await h.startRedis();
  const server = await h.startServer('draining', { REDIS_URL: redis.url, DRAIN_SECONDS: '1' });
  const s = io(server.url, { transports: ['websocket'], reconnection: false, forceNew: true });
  await h.once(s, 'connect');
  const closed = h.once(s, 'disconnect', 10000);
  server.child.kill('SIGTERM');
  await h.until('readiness 503', 2000, async () => (await fetch(`${server.url}/readyz`)).status === 503);
  assert.equal(s.connected, true, 'sockets stay open during the drain');
  const [reason] = await closed;
  assert.equal(reason, 'transport close');
  const { code } = await server.child.exited;
  assert.equal(code, 0);
});

test('CORS_ORIGINS: a socket.io-client 2.x polling socket from an allowed Origin works, others are refused', async () => {
  const redis = await h.startRedis();
  const server = await h.startServer('origins', { REDIS_URL: redis.url, CORS_ORIGINS: 'https://app.test' });
  const v2 = (origin) => ioV2(server.url, {
    transports: ['polling'], reconnection: false, forceNew: true, extraHeaders: { Origin: origin },
  });
  const allowed = v2('https://app.test');
  const refused = v2('https://evil.test');
  const refusedV4 = io(server.url, {
    transports: ['websocket'], reconnection: false, forceNew: true, extraHeaders: { Origin: 'https://evil.test' },
  });
  const refusals = [h.once(refused, 'connect_error'), h.once(refusedV4, 'connect_error')];
  try {
    await h.once(allowed, 'connect');
    const joined = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no join ack')), 5000);
      allowed.emit('join', 'cors-room', (reply) => { clearTimeout(t); resolve(reply); });
    });
    h.assertJoined(joined);
    const got = new Promise((resolve) => allowed.once('news', (...args) => resolve(args)));
    const r = await h.api(server.url, 'POST', '/v1/broadcast', { rooms: ['cors-room'], event: 'news', data: 'hi' });
    assert.equal(r.status, 202);
    h.assertRoomArgs(await Promise.race([got, h.sleep(5000).then(() => 'timeout')]), 'hi');

    await Promise.all(refusals);
    assert.equal(refused.connected, false);
    assert.equal(refusedV4.connected, false);
    // The refusal is the contract's 403, as a browser's fetch would see it.
    const res = await fetch(`${server.url}/socket.io/?EIO=3&transport=polling`, { headers: { Origin: 'https://evil.test' } });
    assert.equal(res.status, 403);
    assert.equal((await res.json()).error, 'forbidden');
  } finally {
    allowed.close();
    refused.close();
    refusedV4.close();
  }
});
