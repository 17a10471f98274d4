// The chat page's logic: see index.html for how to serve it, its query string and its element
// ids. Everything goes through the client helper (Chorus.wrap), so a server restart or a pod
// move costs neither the room nor a message; when the server no longer had every missed
// message, the helper says so with a `gap` event and the page shows a notice.
(function () {
  'use strict';

  const params = new URLSearchParams(window.location.search);
  const server = (params.get('server') || window.location.origin).replace(/\/+$/, '');
  const token = params.get('token');
  const transport = params.get('transport');
  const name = params.get('name') || `guest-${Math.random().toString(36).slice(2, 6)}`;
  const $ = (id) => document.getElementById(id);

  // The page's state, for people and for browser tests.
  const chat = {
    server,
    name,
    room: null, // the room joined
    connected: false,
    received: [], // {id, offset, room, from, text}: messages from others, in arrival order
    sent: [], // {id, room, text}: this page's own messages, with the ids the server gave them
    gaps: [], // {rooms}: one per `gap` event
    resumes: [], // {rooms, recovered, offset}: one per resume after a reconnect
    errors: [], // {code, message}
    chorus: null,
    socket: null,
  };
  window.chat = chat;

  function setStatus(state) {
    $('status').textContent = state;
    $('status').dataset.state = state;
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = src;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`cannot load ${src}`));
      document.head.appendChild(script);
    });
  }

  // One line of the log. Message text goes in as text, never as HTML.
  function show({ id, offset, from, text, own }) {
    const li = document.createElement('li');
    li.dataset.id = id;
    li.dataset.own = String(own);
    if (offset) li.dataset.offset = offset;
    const who = document.createElement('span');
    who.className = 'from';
    who.textContent = from;
    li.append(who, document.createTextNode(text));
    const log = $('log');
    log.appendChild(li);
    log.dataset.count = String(chat.received.length);
    log.scrollTop = log.scrollHeight;
  }

  function fail(err) {
    chat.errors.push({ code: err.code || 'error', message: err.message });
    const li = document.createElement('li');
    li.className = 'error';
    li.textContent = `(${err.code || 'error'}: ${err.message})`;
    $('log').appendChild(li);
  }

  // Joins `room`, then leaves the previous one: in that order, a refused join leaves the page
  // where it was. Messages name their room, so a late one from the old room is not shown.
  async function join(room) {
    if (!room || room === chat.room) return;
    const previous = chat.room;
    try {
      await chat.chorus.join(room);
    } catch (err) {
      fail(err);
      return;
    }
    chat.room = room;
    $('room').value = room;
    $('log').replaceChildren();
    $('log').dataset.room = room;
    if (previous) chat.chorus.leave(previous).catch(fail);
  }

  async function send(text) {
    if (!text || !chat.room) return;
    const room = chat.room;
    try {
      // The sender does not get its own message back: it is shown from the answer.
      const { id } = await chat.chorus.publish(room, 'chat', { room, from: name, text });
      chat.sent.push({ id, room, text });
      if (room === chat.room) show({ id, from: name, text, own: true });
    } catch (err) {
      fail(err);
    }
  }

  function start() {
    if (typeof window.io !== 'function') {
      throw new Error('socket.io.min.js did not load: put socket.io-client\'s browser bundle next to index.html');
    }
    const opts = {};
    if (transport) opts.transports = [transport];
    // v4 clients send the token in the connection's auth payload; v2 clients (protocol 4)
    // have none, and send it in the query string, which the server reads as well.
    if (token) {
      if (window.io.protocol >= 5) opts.auth = { token };
      else opts.query = { token };
    }
    const socket = window.io(server, opts);
    // Wrapped before any other listener is added, so a reconnect resumes first.
    const chorus = window.Chorus.wrap(socket);
    chat.socket = socket;
    chat.chorus = chorus;

    chorus.on('chat', (data, meta) => {
      if (!data || typeof data.text !== 'string' || data.room !== chat.room) return;
      const msg = {
        id: meta ? meta.id : '', offset: meta ? meta.offset : '',
        room: data.room, from: String(data.from || '?'), text: data.text,
      };
      chat.received.push(msg);
      show({ ...msg, own: false });
    });
    chorus.on('gap', (gap) => {
      // A real app would refetch the room's recent messages from its own backend here.
      chat.gaps.push(gap);
      $('notice').hidden = false;
      $('notice').dataset.gaps = String(chat.gaps.length);
    });
    chorus.on('resumed', (info) => chat.resumes.push(info));
    chorus.on('error', (err) => {
      fail(err);
      // A refused token: a real app would fetch a fresh one, set it and call socket.connect().
      if (err.code === 'unauthorized') setStatus('unauthorized');
    });
    socket.on('connect', () => { chat.connected = true; setStatus('connected'); });
    socket.on('disconnect', () => { chat.connected = false; setStatus('disconnected'); });

    $('room-form').addEventListener('submit', (e) => { e.preventDefault(); join($('room').value.trim()); });
    $('message-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const text = $('message').value.trim();
      $('message').value = '';
      send(text);
    });
    return join(params.get('room') || 'lobby');
  }

  // The helper comes from the server itself, so it always matches the server's version.
  chat.ready = loadScript(`${server}/client/chorus.js`).then(start).catch((err) => {
    setStatus('error');
    fail(err);
    throw err;
  });
}());
