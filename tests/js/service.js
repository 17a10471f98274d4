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
const { headRouter, listen } = require('./proxy');

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

  const server = net.createServer(headRouter(open, stats, (line) => {
    const id = (/[?&]client=([^&\s]+)/.exec(line) || [])[1];
    const hasSid = /[?&]sid=/.test(line);
    let port;
    if (id !== undefined && hasSid && backends.includes(session.get(id))) port = session.get(id);
    else if (backends.length) port = id !== undefined ? place(id) : backends[0];
    if (port !== undefined && id !== undefined) {
      if (!hasSid) session.set(id, port);
      affinity.set(id, { port, at: Date.now() });
    }
    return port;
  }));
  return {
    ...(await listen(server, open)),
    stats,
    setBackends(ports) { backends = [...ports]; },
  };
}

module.exports = { startService };
