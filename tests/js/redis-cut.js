// A cuttable loopback TCP proxy in front of one Redis, for tests of a replica whose Redis link
// breaks while the other replicas (which reach Redis directly) go on publishing. A replica is
// pointed at it with REDIS_URL=redis://127.0.0.1:<proxy port>.
//
// - forwarding: every connection accepted on 127.0.0.1:<port> gets its own connection to the
//   Redis port, bytes copied both ways untouched;
// - cut(): resets every open connection, both sides (the replica's and Redis's, so Redis drops
//   that client and its subscriptions), and from then on resets every new connection at once;
// - restore(): new connections go through again (nothing is replayed: what was published
//   meanwhile never reaches the replica over this link);
// - close(): resets everything and stops listening.
'use strict';

const net = require('node:net');

// RST rather than FIN where the platform allows it: a link that is "cut" is reset.
function reset(socket) {
  if (socket.destroyed) return;
  if (typeof socket.resetAndDestroy === 'function' && socket.readyState !== 'opening') {
    try { socket.resetAndDestroy(); return; } catch { /* fall back below */ }
  }
  socket.destroy();
}

async function startCut(redisPort, { host = '127.0.0.1' } = {}) {
  const open = new Set(); // every socket of every pair, both sides
  let isCut = false;
  const stats = {
    connections: 0, // accepted on the proxy
    forwarded: 0, // of them reached Redis
    refused: 0, // accepted during a cut and reset at once
    reset: 0, // sockets (either side) reset by cut() or close()
    cuts: 0,
    restores: 0,
    bytesToRedis: 0,
    bytesFromRedis: 0,
  };

  const server = net.createServer({ pauseOnConnect: true }, (client) => {
    stats.connections += 1;
    client.on('error', () => {});
    if (isCut) {
      stats.refused += 1;
      reset(client);
      return;
    }
    const upstream = net.connect(redisPort, host);
    upstream.on('error', () => {});
    for (const s of [client, upstream]) {
      s.setNoDelay(true);
      open.add(s);
    }
    // One side gone (closed, reset, refused) takes the other one with it.
    client.once('close', () => { open.delete(client); upstream.destroy(); });
    upstream.once('close', () => { open.delete(upstream); client.destroy(); });
    upstream.once('connect', () => { stats.forwarded += 1; });
    client.on('data', (b) => { stats.bytesToRedis += b.length; });
    upstream.on('data', (b) => { stats.bytesFromRedis += b.length; });
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();

  function resetAll() {
    const all = [...open];
    for (const s of all) {
      stats.reset += 1;
      reset(s);
    }
    return all.length;
  }

  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    stats,
    get isCut() { return isCut; },
    // Sockets currently open through the proxy (each pair counts once).
    get connections() { return Math.floor(open.size / 2); },
    // Returns how many sockets (both sides counted) it reset.
    cut() {
      isCut = true;
      stats.cuts += 1;
      return resetAll();
    },
    restore() {
      isCut = false;
      stats.restores += 1;
    },
    close() {
      isCut = true;
      resetAll();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

module.exports = { startCut };
