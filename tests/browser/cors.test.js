// CORS_ORIGINS as a browser sees it: Debian's Chromium opens a page on another origin than
// chorus-server's, with the Socket.IO client bundles browsers load (socket.io-client 2.x over
// long-polling with its default credentials, 4.x over websocket). From the allowed origin both
// sockets join a room (the ack says from which offset) and receive a broadcast sent through the
// HTTP API, with the message's {id, offset} as its last argument; from refused origins
// both fail to connect, the browser sees 403 answers, and the room holds no socket of theirs.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const chromium = require('./chromium');
const h = require('../js/harness');

const TOKEN = 'browser-test-token';
const WAIT_MS = 10000;

// What the static server serves: the page, and the client bundles straight from node_modules.
const FILES = {
  '/': ['page.html', 'text/html; charset=utf-8'],
  '/socket.io-v2.js': ['node_modules/socket.io-client-v2/dist/socket.io.js', 'text/javascript'],
  '/socket.io-v4.min.js': ['node_modules/socket.io-client/dist/socket.io.min.js', 'text/javascript'],
};

const serveStatic = (port) => chromium.serveStatic(FILES, port);

// The requests a page makes to chorus-server, as the browser's network panel shows them:
// each polling request and websocket handshake with the status the server answered and the
// response headers (also when the browser then blocks the answer by CORS).
async function recordNetwork(page, serverPort) {
  const cdp = await page.createCDPSession();
  const seen = new Map();
  const entry = (id) => {
    if (!seen.has(id)) seen.set(id, { id, url: null, kind: null, status: null, headers: {}, failure: null });
    return seen.get(id);
  };
  const ours = (url) => new URL(url).host === `127.0.0.1:${serverPort}`;
  const lower = (headers) => Object.fromEntries(Object.entries(headers || {}).map(([k, v]) => [k.toLowerCase(), v]));
  cdp.on('Network.requestWillBeSent', (e) => {
    if (e.type !== 'Preflight') Object.assign(entry(e.requestId), { url: e.request.url, kind: 'http' });
  });
  cdp.on('Network.responseReceivedExtraInfo', (e) => {
    Object.assign(entry(e.requestId), { status: e.statusCode, headers: lower(e.headers) });
  });
  cdp.on('Network.loadingFailed', (e) => {
    const failure = e.corsErrorStatus ? `${e.errorText} (${e.corsErrorStatus.corsError})` : e.errorText;
    entry(e.requestId).failure = failure;
  });
  cdp.on('Network.webSocketCreated', (e) => Object.assign(entry(e.requestId), { url: e.url, kind: 'websocket' }));
  cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
    Object.assign(entry(e.requestId), { status: e.response.status, headers: lower(e.response.headers) });
  });
  // A websocket handshake answered with anything but 101 is reported only as this error (the
  // message the console shows), with the status the server answered.
  cdp.on('Network.webSocketFrameError', (e) => {
    const r = entry(e.requestId);
    r.failure = e.errorMessage;
    const code = /Unexpected response code: (\d+)/.exec(e.errorMessage);
    if (code && r.status === null) r.status = Number(code[1]);
  });
  await cdp.send('Network.enable');
  return () => [...seen.values()].filter((r) => r.url && ours(r.url));
}

// Waits (bounded) for a condition inside the page; on timeout says what the page saw.
async function waitInPage(page, what, fn) {
  try {
    await page.waitForFunction(fn, { timeout: WAIT_MS, polling: 50 });
  } catch (err) {
    const state = await page.evaluate(() => JSON.stringify(window.chorus)).catch(() => '(unreadable)');
    throw new Error(`${what}: not within ${WAIT_MS} ms (${err.message}); page saw ${state}`);
  }
}

let browser;
let server;
const statics = [];
let pagePort;

test.before(async () => {
  pagePort = await h.freePort();
  const otherPort = await h.freePort();
  statics.push(await serveStatic(pagePort), await serveStatic(otherPort));
  server = await h.startServer('browser', {
    CORS_ORIGINS: `http://127.0.0.1:${pagePort}`, API_TOKEN: TOKEN,
  });
  server.otherPort = otherPort;
  browser = await chromium.launch();
});

test.after(async () => {
  await chromium.close(browser);
  for (const s of statics) { s.closeAllConnections(); s.close(); }
  await h.stopAll();
});

async function open(origin) {
  const page = await browser.newPage();
  const requests = await recordNetwork(page, server.port);
  await page.goto(`${origin}/?server=${encodeURIComponent(server.url)}`, { timeout: WAIT_MS });
  return { page, requests };
}

test('from an allowed origin: a v2 polling socket and a v4 websocket socket join and receive a broadcast', { timeout: 60000 }, async () => {
  const origin = `http://127.0.0.1:${pagePort}`;
  const { page, requests } = await open(origin);
  await waitInPage(page, 'both sockets joined (or failed)', () => {
    const { v2, v4 } = window.chorus;
    const settled = (s) => s.joinAck || s.connectErrors.length || s.errors.length;
    return settled(v2) && settled(v4);
  });
  const seen = await page.evaluate(() => window.chorus);
  for (const name of ['v2', 'v4']) {
    assert.deepEqual(seen[name].connectErrors, [], `${name} connect errors`);
    assert.deepEqual(seen[name].errors, [], `${name} errors`);
    h.assertJoined(seen[name].joinAck, { what: `${name} join ack` });
  }
  assert.equal(seen.v2.transport, 'polling');
  assert.equal(seen.v4.transport, 'websocket');

  const data = { title: 'cross-origin', n: 11 };
  const r = await h.api(server.url, 'POST', '/v1/broadcast', { rooms: ['news'], event: 'headline', data }, TOKEN);
  assert.equal(r.status, 202, JSON.stringify(r.body));
  await waitInPage(page, 'both sockets received the headline',
    () => window.chorus.v2.headlines.length > 0 && window.chorus.v4.headlines.length > 0);
  const got = await page.evaluate(() => window.chorus);
  const metas = ['v2', 'v4'].map((name) => {
    assert.equal(got[name].headlines.length, 1, `${name} headlines: ${JSON.stringify(got[name].headlines)}`);
    return h.assertRoomArgs(got[name].headlines[0], data, { what: `${name} headline` });
  });
  assert.deepEqual(metas[0], metas[1], 'both sockets got the one message, with its id and offset');

  // The browser was shown the page's own origin with credentials allowed (the v2 client sends
  // credentials, so `*` would have been refused by the browser).
  const polls = requests().filter((q) => q.kind === 'http' && q.status !== null);
  assert.ok(polls.length > 0, 'the v2 socket polled the server');
  for (const q of polls) {
    assert.equal(q.status, 200, `${q.url}: ${q.status}`);
    assert.equal(q.headers['access-control-allow-origin'], origin, q.url);
    assert.equal(q.headers['access-control-allow-credentials'], 'true', q.url);
  }
  const sockets = requests().filter((q) => q.kind === 'websocket');
  assert.deepEqual(sockets.map((q) => q.status), [101]);

  const room = await h.api(server.url, 'GET', '/v1/rooms/news/sockets', undefined, TOKEN);
  assert.equal(room.status, 200);
  const ids = room.body.sockets.map((s) => s.id);
  assert.deepEqual(ids.sort(), [got.v2.id, got.v4.id].sort(), 'the room holds the page\'s two sockets');
});

for (const which of ['another port', 'another host name']) {
  test(`from a refused origin (${which}): both sockets fail to connect on 403 answers, nothing joins`, { timeout: 60000 }, async () => {
    const origin = which === 'another port'
      ? `http://127.0.0.1:${server.otherPort}`
      : `http://localhost:${pagePort}`;
    const members = async () => {
      const room = await h.api(server.url, 'GET', '/v1/rooms/news/sockets', undefined, TOKEN);
      assert.equal(room.status, 200);
      const nodes = await h.api(server.url, 'GET', '/v1/nodes', undefined, TOKEN);
      assert.equal(nodes.status, 200);
      return { room: room.body.sockets.map((s) => s.id).sort(), connected: nodes.body.nodes.map((n) => n.sockets) };
    };
    const before = await members();
    const { page, requests } = await open(origin);
    await waitInPage(page, 'both sockets failed to connect (or joined)', () => {
      const settled = (s) => s.joinAck || s.connectErrors.length || s.errors.length;
      return settled(window.chorus.v2) && settled(window.chorus.v4);
    });
    const seen = await page.evaluate(() => window.chorus);
    assert.equal(seen.v2.connected, false, 'v2 connected');
    assert.equal(seen.v4.connected, false, 'v4 connected');
    assert.ok(seen.v2.connectErrors.length + seen.v2.errors.length > 0, 'v2 reported the failure');
    assert.ok(seen.v4.connectErrors.length > 0, 'v4 connect_error');
    // The server's answers as the browser saw them: a 403 to the polling handshake and to the
    // websocket upgrade (the browser hides it from the page, which only sees an error).
    await h.until('the browser saw the server answer both sockets', WAIT_MS, () => {
      const answered = requests().filter((q) => q.status !== null);
      return answered.some((q) => q.kind === 'http') && answered.some((q) => q.kind === 'websocket');
    }).catch((err) => { throw new Error(`${err.message}: ${JSON.stringify(requests())}`); });
    for (const q of requests()) {
      assert.equal(q.status, 403, `${q.kind} ${q.url}: ${JSON.stringify(q)}`);
      assert.equal(q.headers['access-control-allow-origin'], undefined, q.url);
    }

    // No session was made: the room and the replica hold the allowed page's sockets only.
    assert.deepEqual(await members(), before);
    await page.close();
  });
}
