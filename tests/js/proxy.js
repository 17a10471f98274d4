// A sticky loopback proxy for tests, standing in for a Service with session affinity: each
// incoming connection is sent to the live backend its `client=<id>` query parameter maps to,
// so one client's long-polling requests and its websocket upgrade reach the same replica
// while that replica is live, and another one once it is gone. The test keeps the list of
// live backends (`setBackends`) as it starts and stops replicas.
'use strict';

const net = require('node:net');
const crypto = require('node:crypto');

const HEAD_LIMIT = 16 * 1024; // bytes of request head read before giving up

// Rendezvous hashing: a client keeps its backend while that backend is in the list; when it
// leaves, its clients spread over the others. `sticky` pins a client to where it went last,
// so a backend added later does not take clients away from a live one.
function weight(id, port) {
  return crypto.createHash('sha1').update(`${id}@${port}`).digest().readUInt32BE(0);
}

// A connection handler for loopback proxies: reads the request head, asks `choose` (given the
// request line) for a backend port and pipes the connection there, or answers 503 when there
// is none. Every socket is kept in `open`; `stats.connections` and `stats.refused` are counted.
function headRouter(open, stats, choose) {
  return (client) => {
    stats.connections += 1;
    open.add(client);
    client.on('close', () => open.delete(client));
    client.on('error', () => client.destroy());
    let head = Buffer.alloc(0);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (head.length > HEAD_LIMIT) client.destroy();
        return;
      }
      client.off('data', onData);
      client.pause();
      const port = choose(head.subarray(0, head.indexOf('\r\n')).toString('latin1'));
      if (port === undefined) {
        client.end('HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
        return;
      }
      const upstream = net.connect(port, '127.0.0.1');
      open.add(upstream);
      upstream.on('close', () => { open.delete(upstream); client.destroy(); });
      client.on('close', () => upstream.destroy());
      upstream.on('error', () => { stats.refused = (stats.refused || 0) + 1; upstream.destroy(); });
      upstream.on('connect', () => {
        upstream.setNoDelay(true);
        upstream.write(head);
        client.pipe(upstream);
        upstream.pipe(client);
        client.resume();
      });
    };
    client.setNoDelay(true);
    client.on('data', onData);
  };
}

// Listens on a free loopback port: the proxy's address, and a close that ends every connection.
async function listen(server, open) {
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    close() {
      for (const s of open) s.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

async function startProxy() {
  let backends = [];
  const sticky = new Map();
  const open = new Set();
  const stats = { connections: 0, refused: 0, noClient: 0 };

  function route(id) {
    let best;
    for (const port of backends) if (best === undefined || weight(id, port) > weight(id, best)) best = port;
    return best;
  }
  function pick(id) {
    const last = sticky.get(id);
    if (last !== undefined && backends.includes(last)) return last;
    const best = route(id);
    if (best !== undefined) sticky.set(id, best);
    return best;
  }

  const server = net.createServer(headRouter(open, stats, (line) => {
    const match = /[?&]client=([^&\s]+)/.exec(line);
    if (!match) stats.noClient += 1;
    return match ? pick(decodeURIComponent(match[1])) : undefined;
  }));
  return {
    ...(await listen(server, open)),
    stats,
    route, // the backend a new client with this id would get now
    setBackends(ports) { backends = [...ports].sort((a, b) => a - b); },
    get backends() { return backends.slice(); },
  };
}

module.exports = { startProxy, headRouter, listen };
