// Publish on one chorus-server container, receive on the others (socket.io-client from tests/js).
'use strict';
const path = require('node:path');
const { io } = require(path.join(__dirname, '../js/node_modules/socket.io-client'));

const urls = process.argv.slice(2);
const deadline = Date.now() + 60000;

async function ready(url) {
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`${url}/readyz`);
      if (r.status === 200 && (await r.json()).cluster === 'connected') return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${url} not ready`);
}

function connect(url) {
  return new Promise((resolve, reject) => {
    const s = io(url, { transports: ['websocket'], reconnection: false, forceNew: true });
    s.once('connect', () => resolve(s));
    s.once('connect_error', reject);
  });
}

(async () => {
  for (const u of urls) await ready(u);
  const sockets = await Promise.all(urls.map(connect));
  for (const s of sockets) {
    const ack = await s.timeout(5000).emitWithAck('join', 'img-room');
    if (!ack.ok) throw new Error(`join: ${JSON.stringify(ack)}`);
  }
  const got = sockets.slice(1).map((s) => new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('no delivery within 10 s')), 10000);
    s.once('hello', (d) => { clearTimeout(t); resolve(d); });
  }));
  const ack = await sockets[0].timeout(5000).emitWithAck('publish', { room: 'img-room', event: 'hello', data: { from: 1 } });
  if (!ack.ok) throw new Error(`publish: ${JSON.stringify(ack)}`);
  const data = await Promise.all(got);
  if (!data.every((d) => d.from === 1)) throw new Error(`wrong data ${JSON.stringify(data)}`);
  for (const s of sockets) s.close();
  process.exit(0);
})().catch((e) => { console.error(e.message); process.exit(1); });
