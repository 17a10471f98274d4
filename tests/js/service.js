// A loopback proxy that behaves like a Kubernetes Service in front of the replicas, for the
// rebalancing test. Each client names itself with a `client=<id>` query parameter, standing in
// for its IP address.
//
// - A new Socket.IO session (a request without `sid`) goes to a replica picked at random among
//   the ready ones, as kube-proxy picks an endpoint for a new connection; the requests of that
//   session (with its `sid`) follow it there.
// - `affinityMs` > 0 stands for `sessionAffinity: ClientIP`: a client's new session goes back to
//   the replica of its last connection while that was less than `affinityMs` ago (every
//   connection refreshes it), and is placed anew after.
'use strict';

const net = require('node:net');

const HEAD_LIMIT = 16 * 1024;

async function startService({ affinityMs = 0 } = {}) {
  let backends = [];
  const session = new Map(); // client id -> backend of its current session
  const affinity = new Map(); // client id -> { port, at }
  const open = new Set();
  const stats = { connections: 0, placed: 0, affinityHits: 0 };

  function place(id) {
    const now = Date.now();
    const a = affinity.get(id);
    let port;
    if (affinityMs > 0 && a && now - a.at < affinityMs && backends.includes(a.port)) {
      port = a.port;
      stats.affinityHits += 1;
    } else {
      port = backends[Math.floor(Math.random() * backends.length)];
      stats.placed += 1;
    }
    return port;
  }

  const server = net.createServer((client) => {
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
      const line = head.subarray(0, head.indexOf('\r\n')).toString('latin1');
      const id = (/[?&]client=([^&\s]+)/.exec(line) || [])[1];
      const hasSid = /[?&]sid=/.test(line);
      let port;
      if (id !== undefined && hasSid && backends.includes(session.get(id))) port = session.get(id);
      else if (backends.length) port = id !== undefined ? place(id) : backends[0];
      if (port === undefined) {
        client.end('HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
        return;
      }
      if (id !== undefined) {
        if (!hasSid) session.set(id, port);
        affinity.set(id, { port, at: Date.now() });
      }
      const upstream = net.connect(port, '127.0.0.1');
      open.add(upstream);
      upstream.on('close', () => { open.delete(upstream); client.destroy(); });
      client.on('close', () => upstream.destroy());
      upstream.on('error', () => upstream.destroy());
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
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    stats,
    setBackends(ports) { backends = [...ports]; },
    close() {
      for (const s of open) s.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

module.exports = { startService };
