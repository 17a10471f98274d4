// What the browser tests share: a static server for pages (and the client bundles from
// node_modules) on a loopback port, and Debian's Chromium through puppeteer-core (never a
// downloaded browser), closed without leaving a process behind.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const puppeteer = require('puppeteer-core');

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

// `files` maps a URL path to [file (relative to this folder), content type].
function serveStatic(files, port) {
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, 'http://page').pathname];
    if (!file) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': file[1], 'cache-control': 'no-store' });
    fs.createReadStream(path.join(__dirname, file[0])).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

// Why Chromium cannot run here, or null.
function missingChromium() {
  try { fs.accessSync(CHROMIUM, fs.constants.X_OK); return null; } catch { return `${CHROMIUM} not found (set CHROMIUM_BIN)`; }
}

async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-chromium-'));
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: profile,
    timeout: 30000,
    protocolTimeout: 30000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  browser.profileDir = profile;
  return browser;
}

async function close(browser) {
  if (!browser) return;
  const proc = browser.process();
  let timer;
  const late = new Promise((resolve) => { timer = setTimeout(resolve, 10000); });
  await Promise.race([browser.close().catch(() => {}), late]);
  clearTimeout(timer);
  if (proc && proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  if (browser.profileDir) fs.rmSync(browser.profileDir, { recursive: true, force: true });
}

module.exports = { CHROMIUM, serveStatic, missingChromium, launch, close };
