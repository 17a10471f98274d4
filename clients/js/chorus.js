/*
 * chorus.js: keeps a Socket.IO client's rooms and messages across reconnects to Chorus.
 *
 * A chorus-server replica can go away at any moment (a rollout, a drain, a crash) and the
 * client then reconnects to another one, which knows nothing of the old socket. This helper
 * remembers the rooms the app joined and the offset of the last message it got, and on every
 * reconnect emits `resume`: the server rejoins those rooms and replays what was missed. The
 * app sees each message once and in order, or a `gap` event when the server no longer had
 * everything. See docs/client.md.
 *
 * Wraps a socket.io-client v4 or v2 socket (v2 is what sails.io.js bundles). No dependencies.
 * In a browser, <script src="https://your-chorus/client/chorus.js"> defines `Chorus`;
 * in Node, `const Chorus = require('./chorus.js')`.
 */
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.Chorus = factory();
}(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  // Events the helper emits itself. `error` is reserved by Socket.IO, so no message can carry
  // that name; `gap` and `resumed` are taken from the app's message names.
  const OWN_EVENTS = ['gap', 'resumed', 'error'];

  const DEFAULTS = {
    timeout: 10000, // ms to wait for an ack before rejecting with code `timeout`
    remember: 1000, // message ids kept to drop duplicates (and, separately, own messages)
    retryMin: 500, // ms before reconnecting after the server closed the socket...
    retryMax: 30000, // ...doubling each time the server closes it again, up to this
  };

  // A set of ids that forgets its oldest beyond `limit`, so memory stays bounded however
  // long the page lives (a Set iterates in insertion order).
  class RecentIds {
    constructor(limit) { this.limit = limit; this.ids = new Set(); }
    has(id) { return this.ids.has(id); }
    add(id) {
      this.ids.delete(id);
      this.ids.add(id);
      if (this.ids.size > this.limit) this.ids.delete(this.ids.values().next().value);
    }
  }

  function chorusError(code, message, ack) {
    const err = new Error(message || code);
    err.code = code;
    if (ack !== undefined) err.ack = ack;
    return err;
  }

  // An exception in one app handler must not skip the other handlers or the helper's own
  // bookkeeping; it is rethrown on its own so it still shows up.
  function call(handler, args) {
    try { handler.apply(null, args); } catch (e) { setTimeout(() => { throw e; }); }
  }

  function wrap(socket, options) {
    const opts = Object.assign({}, DEFAULTS, options);
    const rooms = new Set();
    const seen = new RecentIds(opts.remember); // messages already handed to the app
    const mine = new RecentIds(opts.remember); // messages this client published
    const handlers = new Map(); // event -> { list: [handler], listener: socket listener }
    const pending = new Set(); // requests waiting for their ack
    let offset = null; // last offset received (message meta, join or resume ack); opaque
    let closed = false; // the app called close(): no reconnecting on its behalf
    let retries = 0;
    let retryTimer = null;
    let rebalanceTimer = null;
    let connectedAt = 0;

    function emitOwn(name, value) {
      const entry = handlers.get(name);
      if (entry) entry.list.slice().forEach((h) => call(h, [value]));
      else if (name === 'error') console.warn('chorus:', value.code, value.message);
    }

    // One client event and its ack, as a Promise. Neither client calls a plain ack callback
    // when the connection drops, and v2 has no ack timeout, so both are handled here.
    // `onOk` runs inside the ack callback, before any message that came after the ack in the
    // same read is handled (a Promise's `then` would run after them).
    function request(event, payload, onOk) {
      return new Promise((resolve, reject) => {
        const req = {
          sent: false,
          // The wait starts when the request goes out: emitted while disconnected, it waits in
          // socket.io-client's buffer until the next connect (see the `connect` listener).
          send() {
            req.sent = true;
            req.timer = setTimeout(() => req.settle(chorusError('timeout',
              `no answer to ${event} within ${opts.timeout} ms`)), opts.timeout);
          },
          settle(err, ack) {
            if (!pending.delete(req)) return; // already settled (timeout, disconnect)
            clearTimeout(req.timer);
            if (err) reject(err); else resolve(ack);
          },
        };
        pending.add(req);
        if (socket.connected) req.send();
        socket.emit(event, payload, (ack) => {
          if (ack && ack.ok === true) {
            if (onOk && pending.has(req)) onOk(ack);
            req.settle(null, ack);
          }
          else if (ack && ack.ok === false) req.settle(chorusError(ack.error, ack.message, ack));
          else req.settle(chorusError('invalid_response', `unexpected answer to ${event}`, ack));
        });
      });
    }

    // The socket listener for one message event: keeps the offset, drops what the app has
    // already seen or sent itself (a replay after resume can hold both), then calls handlers.
    function listenerFor(event) {
      return function (data, meta) {
        // Room messages carry {id, offset}; broadcasts to every socket and servers with
        // history off send none, and those are passed on as they come.
        if (meta && typeof meta === 'object' && typeof meta.id === 'string') {
          // Messages arrive in offset order, so the last one is where this client stands,
          // dropped or not. Offsets are opaque: kept, never compared.
          if (typeof meta.offset === 'string') offset = meta.offset;
          if (seen.has(meta.id) || mine.has(meta.id)) return;
          seen.add(meta.id);
        }
        const entry = handlers.get(event);
        if (entry) entry.list.slice().forEach((h) => call(h, [data, meta]));
      };
    }

    function on(event, handler) {
      let entry = handlers.get(event);
      if (!entry) {
        entry = { list: [], listener: OWN_EVENTS.includes(event) ? null : listenerFor(event) };
        handlers.set(event, entry);
        if (entry.listener) socket.on(event, entry.listener);
      }
      entry.list.push(handler);
      return api;
    }

    function off(event, handler) {
      const entry = handlers.get(event);
      if (!entry) return api;
      entry.list = handler ? entry.list.filter((h) => h !== handler) : [];
      if (!entry.list.length) {
        if (entry.listener) socket.off(event, entry.listener);
        handlers.delete(event);
      }
      return api;
    }

    function join(room) {
      return request('join', room, (ack) => {
        rooms.add(room);
        if (typeof ack.offset === 'string') offset = ack.offset;
      });
    }

    function leave(room) {
      // Forgotten at once: a reconnect while the leave is on its way must not rejoin the room.
      rooms.delete(room);
      return request('leave', room);
    }

    function publish(room, event, data) {
      return request('publish', { room, event, data }, (ack) => {
        if (typeof ack.id === 'string') mine.add(ack.id);
      });
    }

    // Rejoins the remembered rooms on the current socket and has the server replay what was
    // missed since `offset`. Resolves with {rooms, recovered, offset}, or null when there was
    // nothing to resume or it failed (failures are reported as `error` events).
    function resume() {
      const list = Array.from(rooms);
      if (!list.length) {
        // Nothing to resume; the server still learns that this client honours
        // `chorus:rebalance` (no answer wanted).
        if (socket.connected) socket.emit('resume', { rooms: [], since: null, rebalance: true });
        return Promise.resolve(null);
      }
      const since = offset;
      // No offset with history off, or while the server cannot reach Redis: the old position
      // is still the best one to resume from next time.
      const keep = (ack) => { if (typeof ack.offset === 'string') offset = ack.offset; };
      // `rebalance`: this client honours `chorus:rebalance` (below).
      return request('resume', { rooms: list, since, rebalance: true }, keep).then((ack) => {
        const info = { rooms: list, recovered: ack.recovered === true, offset };
        if (!info.recovered) emitOwn('gap', { rooms: list });
        emitOwn('resumed', info);
        return info;
      }, (err) => {
        // The connection dropped again: the next `connect` resumes.
        if (err.code === 'disconnected') return null;
        // An offset this server cannot read (another server version): resume from nothing,
        // which rejoins the rooms and reports a gap, rather than stay out of them.
        if (err.code === 'invalid_request' && since !== null) {
          offset = null;
          return resume();
        }
        err.rooms = list;
        emitOwn('error', err);
        return null;
      });
    }

    function close() {
      closed = true;
      clearTimeout(retryTimer);
      clearTimeout(rebalanceTimer);
      setShed(null);
      socket.close();
      return api;
    }

    // Both v4 and v2 fire `connect` on every (re)connection (v2 also fires `reconnect`, which
    // is ignored so the rooms are resumed once). Registered at wrap time, so it runs before
    // `connect` handlers the app adds later.
    socket.on('connect', () => {
      connectedAt = Date.now();
      closed = false;
      // Requests buffered while disconnected have just been sent (before `connect` fires).
      pending.forEach((req) => { if (!req.sent) req.send(); });
      resume();
    });

    // A replica that holds more than its share of sockets sheds some: it sends them
    // `chorus:rebalance` and closes their transports. The reconnect's handshake says it was
    // shed (`chorus_shed`), so replicas holding their share or more refuse it and it lands on
    // one below. Behind a Service that sends a client's reconnects back to the same replica for
    // a while (session affinity), the event asks the client to stay away past that window, and
    // as long again after each refusal, so that its reconnect is placed anew. The rooms are
    // resumed on the next connection, as after any other.
    let shedBy = null;
    let shedWait = 0;
    let shedRefusals = 0;
    let appReconnects = true; // socket.io-client's own reconnection, as the app set it
    function setShed(from) {
      shedBy = from;
      const o = socket.io && socket.io.opts;
      if (!o) return;
      if (typeof o.query === 'string') {
        o.query = o.query.replace(/&?chorus_shed=[^&]*/, '') + (from ? `&chorus_shed=${encodeURIComponent(from)}` : '');
      } else {
        const q = Object.assign({}, o.query);
        if (from) q.chorus_shed = from; else delete q.chorus_shed;
        o.query = q;
      }
    }
    function reconnectAfter(wait) {
      clearTimeout(rebalanceTimer);
      rebalanceTimer = setTimeout(() => {
        rebalanceTimer = null;
        if (socket.io && typeof socket.io.reconnection === 'function') socket.io.reconnection(appReconnects);
        if (!closed && !socket.connected) socket.connect();
      }, wait);
    }
    socket.on('chorus:rebalance', (info) => {
      if (closed) return;
      const wait = Math.min(Number(info && info.retryAfterMs) || 0, 600000);
      shedWait = wait;
      shedRefusals = 0;
      setShed(typeof (info && info.from) === 'string' && info.from ? info.from : 'yes');
      const manager = socket.io;
      if (!(wait > 0) || !manager || typeof manager.reconnection !== 'function') return;
      // The transport closes next: no reconnect of socket.io-client's own until the wait is over.
      if (!rebalanceTimer) appReconnects = manager.reconnection();
      manager.reconnection(false);
      reconnectAfter(wait);
    });
    // Refused (a replica that holds its share or more): behind an affinity, stop
    // socket.io-client's own retries (each would renew the affinity) and wait as long again;
    // otherwise its own retries go elsewhere.
    // After five refusals the client no longer says it was shed (the counts it was refused on
    // may be stale), and is placed like any other.
    socket.on('connect_error', () => {
      if (!shedBy || closed) return;
      shedRefusals += 1;
      if (shedRefusals >= 5) setShed(null);
      if (!(shedWait > 0)) return;
      socket.disconnect();
      reconnectAfter(shedWait);
    });
    socket.on('connect', () => {
      clearTimeout(rebalanceTimer);
      rebalanceTimer = null;
      if (shedBy) setShed(null);
    });

    socket.on('disconnect', (reason) => {
      // Requests sent on the lost connection will never be answered; the app decides whether
      // to retry. A publish rejected so may still have been delivered.
      pending.forEach((req) => {
        if (req.sent) req.settle(chorusError('disconnected', 'the connection closed before the answer'));
      });
      // socket.io-client reconnects by itself after a lost transport (replica drained or dead,
      // network), but not after the server disconnected the socket (too slow, over its rate,
      // token expired): that is done here, later each time the server does it again.
      if (reason === 'io server disconnect' && !closed) {
        if (Date.now() - connectedAt > opts.retryMax) retries = 0;
        // Random spread, so many clients disconnected together do not come back together.
        const delay = Math.min(opts.retryMax, opts.retryMin * 2 ** retries) * (0.5 + Math.random() / 2);
        retries += 1;
        clearTimeout(retryTimer);
        retryTimer = setTimeout(() => { if (!closed) socket.connect(); }, delay);
      }
    });

    // A refused token: v4 reports a `connect_error`, v2 an `error` packet. Retrying with the
    // same token would loop (v2's client even retries by itself whenever its transport closes),
    // so the socket is closed until the app connects again with a fresh token.
    function refused(err) {
      if (!err || (err.message || err) !== 'unauthorized') return;
      clearTimeout(retryTimer);
      clearTimeout(rebalanceTimer);
      rebalanceTimer = null;
      setShed(null);
      socket.close();
      emitOwn('error', chorusError('unauthorized',
        'the server refused the token: set a fresh one and call socket.connect()'));
    }
    socket.on('connect_error', refused);
    socket.on('error', refused);

    if (socket.connected) resume();

    const api = {
      socket, join, leave, publish, on, off, resume, close,
      get rooms() { return Array.from(rooms); },
      get offset() { return offset; },
    };
    return api;
  }

  return { wrap };
}));
