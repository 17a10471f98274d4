// The example chat page (examples/chat: index.html + chat.js, on the helper the server serves
// at /client/chorus.js) in Debian's Chromium across a restart of its replica: two replicas on
// one Redis (history on, the default); the page joins `lobby` on replica A while numbered
// messages are broadcast to the room through replica B at a steady pace; A is killed
// (SIGKILL) mid-stream and restarted on its port, the page reconnects and resumes by itself,
// and in the end window.chat holds every message exactly once, in order, and saw no gap.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const chromium = require('./chromium');
const h = require('../js/harness');

const SUITE = 'browser test of the example chat page (tests/browser/chat.test.js)';
const missing = [h.missingTools(), chromium.missingChromium()].filter(Boolean).join('; ');
const skip = missing ? h.cannotRun(SUITE, missing) : false;

const WAIT_MS = 20000; // longest wait for anything expected (socket.io-client's own backoff included)
const PACE_MS = 100; // one message every PACE_MS
const BEFORE = 15; // messages published before the kill
const MAX = 90; // at most this many in all: fewer than HISTORY_SIZE (100) keeps, so no gap is allowed
const AFTER = 15; // messages published after the page resumed

// The page and its script from examples/chat, with socket.io-client 4's browser bundle beside
// them as the page expects it (socket.io.min.js).
const FILES = {
  '/': ['../../examples/chat/index.html', 'text/html; charset=utf-8'],
  '/index.html': ['../../examples/chat/index.html', 'text/html; charset=utf-8'],
  '/chat.js': ['../../examples/chat/chat.js', 'text/javascript'],
  '/socket.io.min.js': ['node_modules/socket.io-client/dist/socket.io.min.js', 'text/javascript'],
};

let browser;
let statics;

test.after(async () => {
  await chromium.close(browser);
  if (statics) { statics.closeAllConnections(); statics.close(); }
  await h.stopAll();
});

async function waitInPage(page, what, fn, arg) {
  try {
    // Polling by interval: animation-frame polling stalls in background tabs.
    await page.waitForFunction(fn, { timeout: WAIT_MS, polling: 100 }, arg);
  } catch (err) {
    const state = await page.evaluate(() => JSON.stringify({
      connected: window.chat.connected, room: window.chat.room, received: window.chat.received.length,
      gaps: window.chat.gaps, resumes: window.chat.resumes, errors: window.chat.errors,
    })).catch(() => '(unreadable)');
    throw new Error(`${what}: not within ${WAIT_MS} ms (${err.message}); page saw ${state}`);
  }
}

test('the chat page keeps every message, once and in order, across a SIGKILL and restart of its replica', { skip, timeout: 120000 }, async () => {
  const redis = await h.startRedis();
  const env = { REDIS_URL: redis.url };
  let a = await h.startServer('chat-a', env);
  const b = await h.startServer('chat-b', env);
  const pagePort = await h.freePort();
  statics = await chromium.serveStatic(FILES, pagePort);
  browser = await chromium.launch();

  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  await page.goto(`http://127.0.0.1:${pagePort}/?server=${encodeURIComponent(a.url)}&room=lobby&name=reader`,
    { timeout: WAIT_MS });
  await page.bringToFront();
  await waitInPage(page, 'the page joined lobby on replica A',
    () => window.chat && window.chat.connected && window.chat.room === 'lobby');

  let n = 0;
  const publish = async () => {
    const i = n++;
    const r = await h.api(b.url, 'POST', '/v1/broadcast',
      { rooms: ['lobby'], event: 'chat', data: { room: 'lobby', from: 'publisher', text: `message ${i}` } });
    assert.equal(r.status, 202, JSON.stringify(r.body));
  };
  // The publisher runs at a steady pace through replica B until told to stop (or MAX).
  let stopAt = MAX;
  const publisher = (async () => {
    while (n < Math.min(stopAt, MAX)) {
      await publish();
      await h.sleep(PACE_MS);
    }
  })();

  await waitInPage(page, `the first ${BEFORE} messages arrived through A`,
    (k) => window.chat.received.length >= k, BEFORE);
  a.child.kill('SIGKILL');
  await a.child.exited;
  const atKill = n;
  await waitInPage(page, 'the page saw its replica go', () => !window.chat.connected);
  await h.sleep(1000); // messages published while A is down
  const atRestart = n;
  a = await h.startServer('chat-a-again', { ...env, PORT: String(a.port) });
  await waitInPage(page, 'the page reconnected and resumed by itself', () => window.chat.resumes.length >= 1);
  const atResume = n;
  stopAt = n + AFTER;
  await publisher;
  const total = n;
  await waitInPage(page, `all ${total} messages arrived`, (k) => window.chat.received.length >= k, total);
  await h.sleep(500); // nothing more (no duplicate) arrives late

  const chat = await page.evaluate(() => ({
    received: window.chat.received, gaps: window.chat.gaps, resumes: window.chat.resumes,
    errors: window.chat.errors, connected: window.chat.connected, room: window.chat.room,
    shown: document.querySelectorAll('#log li[data-own="false"]').length,
    count: Number(document.getElementById('log').dataset.count),
    notice: !document.getElementById('notice').hidden,
  }));
  const texts = chat.received.map((m) => m.text);
  const ids = new Set(chat.received.map((m) => m.id));
  const counts = {
    published: total, beforeKill: atKill, whileDown: atRestart - atKill, restartToResume: atResume - atRestart,
    afterResume: total - atResume, received: texts.length, distinctIds: ids.size, shown: chat.shown,
    gaps: chat.gaps.length, resumes: chat.resumes.length,
  };
  console.log(`chat page counts: ${JSON.stringify(counts)}`);

  assert.ok(atRestart > atKill, 'messages were published while replica A was down');
  assert.deepEqual(texts, Array.from({ length: total }, (_, i) => `message ${i}`), 'every message once, in order');
  assert.equal(ids.size, total, 'distinct message ids');
  assert.ok(chat.received.every((m) => m.room === 'lobby' && m.from === 'publisher' && m.offset), 'room, sender and offset');
  assert.equal(chat.shown, total, 'one log line per message');
  assert.equal(chat.count, total, '#log data-count');
  assert.deepEqual(chat.gaps, [], 'no gap');
  assert.equal(chat.notice, false, 'no gap notice shown');
  assert.ok(chat.resumes.length >= 1 && chat.resumes.every((r) => r.recovered === true),
    `resumed and recovered: ${JSON.stringify(chat.resumes)}`);
  assert.deepEqual(chat.errors, [], 'no error');
  assert.deepEqual(pageErrors, [], 'no uncaught error in the page');
  assert.equal(chat.connected, true);
  assert.equal(chat.room, 'lobby');
});
