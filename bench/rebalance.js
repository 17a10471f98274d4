#!/usr/bin/env node
// Rebalancing after a scale-up, measured (docs/benchmarks.md, *Rebalancing after a scale-up*).
//
// One run: a redis-server and two release chorus-server replicas on free loopback ports, behind
// the Service-like proxy of tests/js/service.js; N helper clients (clients/js/chorus.js over
// socket.io-client 4, websocket) each in two of 40 rooms, connected in batches; a publisher
// sending 20 messages/s over the HTTP API. Once the two replicas hold the N clients and the
// counts are steady, a third replica starts and joins the proxy (t0). GET /v1/nodes is polled
// every 500 ms until balance: every replica within REBALANCE_TOLERANCE of the mean and all N
// clients connected; then until 10 s after balance and 10 s after the last shed socket. Every
// client must end with every acknowledged message of its rooms exactly once and in order.
// Appends one JSON line to --out.
//
//   node bench/rebalance.js --clients 2000 [--affinity-seconds 5] [--out FILE] [--timeout-s 600]
//
// Run by scripts/bench-rebalance.sh. Starts only loopback processes and stops every one it
// started (harness.stopAll) on success, failure, SIGINT and SIGTERM; a watchdog ends a run that
// overruns its bounds.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const { execFileSync } = require('node:child_process');
const { createRequire } = require('node:module');

const ROOT = path.resolve(__dirname, '..');
// The harness reads CHORUS_SERVER_BIN when it is loaded; this benchmark wants the release build.
if (!process.env.CHORUS_SERVER_BIN) process.env.CHORUS_SERVER_BIN = path.join(ROOT, 'target/release/chorus-server');
const h = require(path.join(ROOT, 'tests/js/harness'));
const { startService } = require(path.join(ROOT, 'tests/js/service'));
const { io } = createRequire(path.join(ROOT, 'tests/js/package.json'))('socket.io-client');
const Chorus = require(path.join(ROOT, 'clients/js/chorus.js'));

function args(argv) {
  const o = {
    clients: 2000, affinitySeconds: 0, out: '', timeoutS: 600, rooms: 40, roomsPerClient: 2,
    publishRate: 20, batch: 100, label: '',
  };
  const names = {
    '--clients': 'clients', '--affinity-seconds': 'affinitySeconds', '--out': 'out', '--timeout-s': 'timeoutS',
    '--rooms': 'rooms', '--rooms-per-client': 'roomsPerClient', '--publish-rate': 'publishRate',
    '--batch': 'batch', '--label': 'label',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || argv[i + 1] === undefined) throw new Error(`usage: rebalance.js [--clients N] [--affinity-seconds S] [--out FILE] [--timeout-s S] [--rooms R] [--rooms-per-client K] [--publish-rate R] [--batch B] [--label L]; got ${argv[i]}`);
    o[key] = typeof o[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
    if (typeof o[key] === 'number' && !(Number.isFinite(o[key]) && o[key] >= 0)) throw new Error(`${argv[i]}: not a number`);
  }
  if (!(o.clients >= 3 && o.clients <= 20000)) throw new Error('--clients: 3 to 20000');
  if (!(o.timeoutS > 0 && o.timeoutS <= 3600)) throw new Error('--timeout-s: 1 to 3600');
  if (!(o.roomsPerClient >= 1 && o.roomsPerClient <= o.rooms)) throw new Error('--rooms-per-client: 1 to --rooms');
  if (!(o.publishRate > 0 && o.publishRate <= 200)) throw new Error('--publish-rate: above 0, at most 200');
  if (!(o.batch >= 1)) throw new Error('--batch: at least 1');
  return o;
}

const opt = args(process.argv);
const TOLERANCE = 0.2; // the server's default, set explicitly as the rebalance test does
const TOKEN = `bench-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
const POLL_MS = 500;
const AFTER_BALANCE_MS = 10000; // keep watching this long after balance...
const QUIET_MS = 10000; // ...and after the last shed socket (a round's cool-down is 8 s)
const STEADY_MS = 10000; // the counts before t0: unchanged this long, which is also the baseline CPU window
const CONNECT_MS = 30000 + opt.clients * 60; // bound on connecting and joining every client
// Bound on every client being back with the last messages once the publisher stops: behind an
// affinity a shed client stays away a window or more after each refusal, up to six times.
const DELIVERED_MS = 60000 + 10 * opt.affinitySeconds * 1000;
const HARD_MS = CONNECT_MS + 60000 + opt.timeoutS * 1000 + 120000 + DELIVERED_MS + 60000;
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
const log = (...a) => console.error(`${new Date().toISOString().slice(11, 19)} rebalance N=${opt.clients}${opt.affinitySeconds ? ` affinity=${opt.affinitySeconds}s` : ''}:`, ...a);
const round = (x, d = 2) => (x === null || x === undefined || !Number.isFinite(x) ? null : Number(x.toFixed(d)));

// ---- processes and cleanup ----

const sockets = [];
let service = null;
let publishing = false;
let cleaned = false;
function cleanupSync() {
  if (cleaned) return;
  cleaned = true;
  publishing = false;
  for (const s of sockets) { try { s.close(); } catch { /* closing anyway */ } }
  if (service) { try { service.close(); } catch { /* closing anyway */ } }
  h.stopAll(); // its SIGKILLs are sent before its first await
}
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { log(`${sig}: stopping every process this run started`); cleanupSync(); process.exit(130); });
}
process.on('exit', cleanupSync);
const watchdog = setTimeout(() => {
  log(`run exceeded its bound of ${HARD_MS} ms: stopping`);
  cleanupSync();
  process.exit(2);
}, HARD_MS);
watchdog.unref();

// ---- measurements ----

function procCpu(pid) {
  // utime and stime are fields 14 and 15 of /proc/<pid>/stat, counted after the `(comm)`.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / CLK_TCK;
}
function machineCpu() {
  // Busy and total jiffies of the whole machine (every CPU), from the first line of /proc/stat.
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((s, v) => s + v, 0); // user nice system idle iowait irq softirq steal
  const idle = f[3] + f[4];
  return { busy: (total - idle) / CLK_TCK, total: total / CLK_TCK, steal: (f[7] || 0) / CLK_TCK };
}
function snapshot(procs) {
  return {
    at: Date.now(),
    procs: Object.fromEntries(procs.map((p) => [p.name, procCpu(p.pid)])),
    self: procCpu(process.pid),
    machine: machineCpu(),
  };
}
// CPU seconds of each process between two snapshots, and as % of one core over that interval.
function cpuBetween(a, b) {
  const s = (b.at - a.at) / 1000;
  const per = {};
  let cluster = 0;
  for (const name of Object.keys(b.procs)) {
    const used = b.procs[name] - (a.procs[name] ?? b.procs[name]);
    per[name] = { s: round(used, 2), pct: round((100 * used) / s, 1) };
    cluster += used;
  }
  const self = b.self - a.self;
  const busy = b.machine.busy - a.machine.busy;
  const cores = os.cpus().length;
  const other = Math.max(0, busy - cluster - self);
  return {
    interval_s: round(s, 2),
    per_process: per,
    cluster_s: round(cluster, 2),
    cluster_pct_of_one_core: round((100 * cluster) / s, 1),
    loadgen_s: round(self, 2),
    loadgen_pct_of_one_core: round((100 * self) / s, 1),
    machine_busy_pct_of_all_cores: round((100 * busy) / (s * cores), 1),
    other_pct_of_all_cores: round((100 * other) / (s * cores), 1),
    steal_s: round(b.machine.steal - a.machine.steal, 2),
  };
}

async function nodes(replica) {
  const r = await h.api(replica.url, 'GET', '/v1/nodes', undefined, TOKEN);
  if (r.status !== 200) throw new Error(`GET /v1/nodes: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}
async function scrape(replica) {
  const res = await fetch(`${replica.url}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  const m = /^chorus_rebalance_closes_total (\S+)/m.exec(text);
  if (!m) throw new Error(`${replica.name}: no chorus_rebalance_closes_total in /metrics`);
  return Number(m[1]);
}
// The rounds a replica's log reports: the excess each one started with.
function rounds(replica) {
  try {
    return fs.readFileSync(replica.logPath, 'utf8').split('\n')
      .filter((l) => l.includes('shedding the excess'))
      .map((l) => Number((/excess=(\d+)/.exec(l) || [])[1]));
  } catch { return null; }
}

function facts(bin) {
  const run = (cmd, a, cwd) => { try { return execFileSync(cmd, a, { cwd, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim(); } catch { return null; } };
  const status = run('git', ['status', '--porcelain', '--', 'server', 'clients/js', 'Cargo.lock'], ROOT);
  return {
    git_commit: run('git', ['rev-parse', 'HEAD'], ROOT),
    // Uncommitted changes under server/, clients/js/ or Cargo.lock when the run started (other
    // work in the same tree); the binary is built from the working tree.
    git_server_dirty: status === null ? null : status.length > 0,
    chorus_version: run(bin, ['--version']),
    chorus_bin: bin,
    node_version: process.version,
    socket_io_client: createRequire(path.join(ROOT, 'tests/js/package.json'))('socket.io-client/package.json').version,
    redis_version: (/v=(\S+)/.exec(run('redis-server', ['--version']) || '') || [])[1] || null,
    nproc: Number(run('nproc', [])) || os.cpus().length,
    cpu_model: os.cpus()[0] && os.cpus()[0].model,
    kernel: os.release(),
    mem_gib: round(os.totalmem() / 2 ** 30, 1),
    loadavg_1m_at_start: round(os.loadavg()[0], 2),
    clk_tck: CLK_TCK,
    nofile_limit: run('sh', ['-c', 'ulimit -n']),
  };
}

// ---- the run ----

async function main() {
  const N = opt.clients;
  const affinityMs = opt.affinitySeconds * 1000;
  const bin = process.env.CHORUS_SERVER_BIN;
  const missing = h.missingTools();
  if (missing) throw new Error(missing);
  const machine = facts(bin);
  const started = new Date();
  log(`starting (${machine.chorus_version}, ${machine.git_commit && machine.git_commit.slice(0, 7)})`);

  const redis = await h.startRedis();
  service = await startService({ affinityMs });
  const env = {
    REDIS_URL: redis.url, HISTORY_SIZE: '2000', API_TOKEN: TOKEN,
    // The server's defaults, set explicitly: this is what a scale-up does out of the box.
    REBALANCE_RATE: '0.005', REBALANCE_TOLERANCE: String(TOLERANCE),
    REBALANCE_AFFINITY_SECONDS: String(opt.affinitySeconds),
  };
  const replicas = [await h.startServer('rb-1', env), await h.startServer('rb-2', env)];
  service.setBackends(replicas.map((r) => r.port));

  // Clients: room k of client i is (i + k * step) % rooms, so each room has the same number.
  const ROOMS = Array.from({ length: opt.rooms }, (_, k) => `room-${k}`);
  const step = Math.max(1, Math.floor(opt.rooms / opt.roomsPerClient));
  const clients = [];
  const connectStart = Date.now();
  for (let i = 0; i < N; i++) {
    const socket = io(service.url, { forceNew: true, transports: ['websocket'], query: { client: `c${i}` } });
    sockets.push(socket);
    const chorus = Chorus.wrap(socket);
    const rooms = Array.from({ length: opt.roomsPerClient }, (_, k) => ROOMS[(i + k * step) % opt.rooms]);
    const c = {
      i, rooms, chorus, socket, got: [], raw: new Set(), rawDups: 0, gaps: 0, errors: [],
      connects: 0, shedEvents: 0, toldAgain: 0, refusals: 0, shedPending: false, ordinaryReconnects: 0,
    };
    socket.on('m', (data) => {
      const n = data && data.n;
      if (c.raw.has(n)) c.rawDups += 1; else c.raw.add(n);
    });
    socket.on('connect', () => {
      c.connects += 1;
      if (c.connects > 1 && !c.shedPending) c.ordinaryReconnects += 1;
      c.shedPending = false;
    });
    // A second `chorus:rebalance` before the client reconnected: the server told (and counted)
    // the same socket twice.
    socket.on('chorus:rebalance', () => { c.shedEvents += 1; if (c.shedPending) c.toldAgain += 1; c.shedPending = true; });
    socket.on('connect_error', () => { c.refusals += 1; });
    chorus.on('m', (data) => c.got.push(data.n));
    chorus.on('gap', () => { c.gaps += 1; });
    chorus.on('error', (err) => c.errors.push(err.code));
    clients.push(c);
  }
  // Joined a batch at a time (every client's joins acknowledged before the next batch): a
  // storm of thousands of handshakes at once would be a different benchmark.
  for (let i = 0; i < clients.length; i += opt.batch) {
    if (Date.now() - connectStart > CONNECT_MS) throw new Error(`connecting ${N} clients took more than ${CONNECT_MS} ms`);
    await Promise.all(clients.slice(i, i + opt.batch).map((c) => Promise.all(c.rooms.map((r) => c.chorus.join(r)))));
  }
  const connectS = (Date.now() - connectStart) / 1000;
  log(`${N} clients connected and joined in ${connectS.toFixed(1)} s`);

  // The publisher: publishRate broadcasts a second, one room each, through the replicas in
  // turn (the third too once added), each awaited; what was acknowledged is what must arrive.
  const acked = new Map(ROOMS.map((r) => [r, []]));
  let sent = 0;
  let sendErrors = 0;
  publishing = true;
  const publisher = (async () => {
    const t = Date.now();
    while (publishing) {
      sent += 1;
      const n = sent;
      const room = ROOMS[n % ROOMS.length];
      const target = replicas[n % replicas.length];
      try {
        const r = await h.api(target.url, 'POST', '/v1/broadcast', { rooms: [room], event: 'm', data: { n } }, TOKEN);
        if (r.status === 202) acked.get(room).push(n); else sendErrors += 1;
      } catch { sendErrors += 1; }
      const due = t + (n * 1000) / opt.publishRate;
      await h.sleep(Math.max(0, due - Date.now()));
    }
  })();

  // Steady before t0: both replicas hold every client, counts unchanged for STEADY_MS.
  let before = null;
  let steadySince = 0;
  let steadyKey = '';
  let base0 = null;
  const procs = [{ name: 'redis', pid: redis.child.pid }, ...replicas.map((r) => ({ name: r.name, pid: r.child.pid }))];
  await h.until(`two replicas holding ${N} clients, unchanged for ${STEADY_MS} ms`, 120000, async () => {
    const b = await nodes(replicas[0]);
    const key = JSON.stringify(b.nodes);
    if (b.sockets !== N || b.nodes.length !== 2 || key !== steadyKey) {
      steadyKey = key; steadySince = Date.now(); base0 = snapshot(procs); before = null;
      return false;
    }
    before = b;
    return Date.now() - steadySince >= STEADY_MS;
  });
  const baseline = cpuBetween(base0, snapshot(procs));
  log(`steady: ${JSON.stringify(before.nodes)}; cluster ${baseline.cluster_pct_of_one_core} % of a core with 2 replicas`);

  // Scale-up: the third replica starts, and once ready the proxy places new sessions on it too.
  replicas.push(await h.startServer('rb-3', env));
  procs.push({ name: 'rb-3', pid: replicas[2].child.pid });
  service.setBackends(replicas.map((r) => r.port));
  const t0 = Date.now();
  const snap0 = snapshot(procs);
  const closes0 = await Promise.all(replicas.map(scrape));
  log('third replica added (t0)');

  const series = [];
  let balanceAt = null;
  let bandAt = null;
  let snapBalance = null;
  let movedAtBalance = null;
  let lastMoved = 0;
  let lastCloseAt = null;
  let firstCloseAt = null;
  let lastNodes = null;
  const timeoutAt = t0 + opt.timeoutS * 1000;
  for (let tick = 0; ; tick += 1) {
    const due = t0 + tick * POLL_MS;
    await h.sleep(Math.max(0, due - Date.now()));
    const now = Date.now();
    if (now > timeoutAt) break;
    let b = null;
    let closes = null;
    try { [b, closes] = await Promise.all([nodes(replicas[0]), Promise.all(replicas.map(scrape))]); } catch (e) {
      series.push({ t: round((now - t0) / 1000, 1), error: String(e.message || e) });
      continue;
    }
    const moved = closes.reduce((s, v, k) => s + v - closes0[k], 0);
    if (moved !== lastMoved) { lastMoved = moved; lastCloseAt = now; if (firstCloseAt === null) firstCloseAt = now; }
    const connected = clients.reduce((s, c) => s + (c.socket.connected ? 1 : 0), 0);
    const counts = replicas.map((r) => (b.nodes.find((x) => x.id === r.name) || { sockets: null }).sockets);
    series.push({ t: round((now - t0) / 1000, 1), sockets: counts, total: b.sockets, connected, moved });
    lastNodes = b;
    const mean = b.sockets / replicas.length;
    const inBand = b.nodes.length === replicas.length && counts.every((x) => x !== null && Math.abs(x - mean) <= TOLERANCE * mean);
    if (inBand && bandAt === null) bandAt = now;
    if (balanceAt === null && inBand && connected === N && b.sockets === N) {
      balanceAt = now;
      snapBalance = snapshot(procs);
      movedAtBalance = moved;
      log(`balanced after ${((now - t0) / 1000).toFixed(1)} s: ${JSON.stringify(counts)}, ${moved} moved`);
    }
    if (balanceAt !== null && now - balanceAt >= AFTER_BALANCE_MS && now - (lastCloseAt || t0) >= QUIET_MS) break;
  }
  const end = Date.now();
  const closesEnd = await Promise.all(replicas.map(scrape));
  const closesBy = Object.fromEntries(replicas.map((r, k) => [r.name, closesEnd[k] - closes0[k]]));
  const moved = Object.values(closesBy).reduce((s, v) => s + v, 0);
  const after = await nodes(replicas[0]).catch(() => lastNodes);

  publishing = false;
  await publisher;
  const need = (c) => c.rooms.flatMap((r) => acked.get(r));
  const deliveredBy = Date.now() + DELIVERED_MS;
  let allBackAt = balanceAt;
  while (Date.now() < deliveredBy) {
    if (allBackAt === null && clients.every((c) => c.socket.connected)) allBackAt = Date.now();
    if (clients.every((c) => c.socket.connected && c.got.length >= need(c).length && need(c).every((x) => c.raw.has(x)))) break;
    await h.sleep(200);
  }

  // Exactly once and in order, per client, as tests/js/rebalance.test.js counts it.
  let lost = 0; let duplicates = 0; let rawDuplicates = 0; let outOfOrder = 0; let gaps = 0; let errors = 0;
  // A client still away when the bound ran out has not had the chance to resume: what it misses
  // is counted apart from what a connected client lost.
  let notBack = 0; let missingNotBack = 0;
  const problems = [];
  for (const c of clients) {
    const want = need(c);
    const ackedSet = new Set(want);
    const got = new Set(c.got);
    const missingHere = want.filter((x) => !got.has(x)).length;
    const dups = c.got.length - got.size;
    const inAck = c.got.filter((x) => ackedSet.has(x));
    const order = inAck.some((x, k) => k > 0 && x <= inAck[k - 1]);
    if (c.socket.connected) lost += missingHere; else { notBack += 1; missingNotBack += missingHere; }
    duplicates += dups; rawDuplicates += c.rawDups; gaps += c.gaps; errors += c.errors.length;
    if (order) outOfOrder += 1;
    if ((missingHere || dups || order || c.gaps || c.errors.length || c.rawDups) && problems.length < 20) {
      problems.push(`client ${c.i}${c.socket.connected ? '' : ' (still away)'}: missing ${missingHere}, duplicated ${dups}, raw copies twice ${c.rawDups}${order ? ', out of order' : ''}, gaps ${c.gaps}, errors ${c.errors.slice(0, 3).join(',')}`);
    }
  }
  const reconnects = clients.reduce((s, c) => s + c.connects - 1, 0);
  const ordinary = clients.reduce((s, c) => s + c.ordinaryReconnects, 0);
  const roundsBy = Object.fromEntries(replicas.map((r) => [r.name, rounds(r)]));

  // The fewest moves: the new replica's share, ceil(N/3), less what it got from reconnects of
  // clients nobody shed (none here: nothing else disconnects them). And, as the rebalance test
  // counts it, the fewest that bring every replica within the tolerance.
  const mean = N / replicas.length;
  const minimum = Math.max(0, Math.ceil(mean) - ordinary);
  const aboveBand = before.nodes.reduce((s, x) => s + Math.max(0, x.sockets - Math.floor((1 + TOLERANCE) * mean)), 0);
  const minimumBand = Math.max(aboveBand, Math.ceil((1 - TOLERANCE) * mean));
  if (balanceAt === null) problems.push(`not balanced within ${opt.timeoutS} s`);
  if (closesBy['rb-3'] > 0) problems.push(`the new replica shed ${closesBy['rb-3']} sockets`);
  for (const [name, list] of Object.entries(roundsBy)) if (list && list.length > 1) problems.push(`${name} ran ${list.length} rounds: excess ${list.join(', ')}`);
  if (moved > 1.5 * minimumBand) problems.push(`moved ${moved}, more than 1.5 times the fewest within the tolerance (${minimumBand})`);
  if (notBack) problems.push(`${notBack} clients not back ${Math.round(DELIVERED_MS / 1000)} s after the publisher stopped (${missingNotBack} messages not yet delivered to them)`);
  if (lost || duplicates || outOfOrder || rawDuplicates) problems.push(`messages: lost ${lost}, duplicated ${duplicates}, raw copies twice ${rawDuplicates}, clients out of order ${outOfOrder}`);

  const cpu = balanceAt !== null ? cpuBetween(snap0, snapBalance) : null;
  const cpuToEnd = cpuBetween(snap0, snapshot(procs));
  const sentTotal = sent;
  const ackedTotal = [...acked.values()].reduce((s, a) => s + a.length, 0);
  const line = {
    bench: 'rebalance',
    ts: started.toISOString(),
    label: opt.label || undefined,
    ok: problems.length === 0,
    problems,
    clients: N,
    replicas_before: 2,
    replicas_after: 3,
    proxy: affinityMs ? `ClientIP affinity ${opt.affinitySeconds} s` : 'spread (no affinity)',
    env: { REBALANCE_RATE: env.REBALANCE_RATE, REBALANCE_TOLERANCE: env.REBALANCE_TOLERANCE, REBALANCE_AFFINITY_SECONDS: env.REBALANCE_AFFINITY_SECONDS, HISTORY_SIZE: env.HISTORY_SIZE, DRAIN_SECONDS: '0', API_TOKEN: 'set', auth: 'anonymous' },
    client: { library: 'clients/js/chorus.js + socket.io-client', transport: 'websocket', options: 'socket.io-client and helper defaults', rooms: opt.rooms, rooms_per_client: opt.roomsPerClient, connect_batch: opt.batch },
    connect_s: round(connectS, 1),
    before: before.nodes,
    after: after && after.nodes,
    time_to_balance_s: balanceAt === null ? null : round((balanceAt - t0) / 1000, 1),
    time_to_band_s: bandAt === null ? null : round((bandAt - t0) / 1000, 1),
    first_close_s: firstCloseAt === null ? null : round((firstCloseAt - t0) / 1000, 1),
    last_close_s: lastCloseAt === null ? null : round((lastCloseAt - t0) / 1000, 1),
    watched_s: round((end - t0) / 1000, 1),
    all_clients_back_s: allBackAt === null ? null : round((allBackAt - t0) / 1000, 1),
    moved: {
      rebalance_closes: moved,
      rebalance_closes_by_replica: closesBy,
      at_balance: movedAtBalance,
      client_reconnects: reconnects,
      client_rebalance_events: clients.reduce((s, c) => s + c.shedEvents, 0),
      client_told_again_before_reconnecting: clients.reduce((s, c) => s + c.toldAgain, 0),
      client_refused_handshakes: clients.reduce((s, c) => s + c.refusals, 0),
      ordinary_reconnects: ordinary,
    },
    rounds_excess_by_replica: roundsBy,
    minimum,
    ratio: minimum ? round(moved / minimum, 3) : null,
    minimum_within_tolerance: minimumBand,
    ratio_within_tolerance: minimumBand ? round(moved / minimumBand, 3) : null,
    cpu_t0_to_balance: cpu,
    cpu_t0_to_end: cpuToEnd,
    cpu_baseline_two_replicas: baseline,
    messages: {
      publish_rate: opt.publishRate, sent: sentTotal, acked: ackedTotal, send_errors: sendErrors,
      expected_deliveries: clients.reduce((s, c) => s + need(c).length, 0),
      lost, duplicates, raw_duplicates: rawDuplicates,
      clients_not_back: notBack, missing_for_clients_not_back: missingNotBack, clients_out_of_order: outOfOrder, gaps, errors,
    },
    proxy_stats: { ...service.stats },
    series,
    machine,
  };
  fs.appendFileSync(opt.out, `${JSON.stringify(line)}\n`);
  log(`${line.ok ? 'ok' : 'PROBLEMS'}: balance ${line.time_to_balance_s} s, moved ${moved} (minimum ${minimum}, ratio ${line.ratio}), ` +
    `cluster ${cpu ? cpu.cluster_pct_of_one_core : '?'} % of a core, lost ${lost}, duplicates ${duplicates}` +
    (problems.length ? `\n  ${problems.join('\n  ')}` : ''));
  return line.ok;
}

if (!opt.out) {
  console.error('--out FILE is required');
  process.exit(2);
}
main().then((ok) => {
  cleanupSync();
  process.exit(ok ? 0 : 1);
}, (err) => {
  log(`failed: ${err && err.stack ? err.stack : err}`);
  try {
    fs.appendFileSync(opt.out, `${JSON.stringify({ bench: 'rebalance', ts: new Date().toISOString(), ok: false, clients: opt.clients, affinity_seconds: opt.affinitySeconds, error: String(err && err.message ? err.message : err) })}\n`);
  } catch { /* the error is on stderr */ }
  cleanupSync();
  process.exit(1);
});
