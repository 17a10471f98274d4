// Holds N Socket.IO clients (socket.io-client v4 over websocket) open on a chorus-server until
// it is told to stop (SIGTERM): the connections the Operator autoscaling engine reads. Prints
// "connected N" once every one is connected; exits 1 if they are not within 30 s.
// Usage: node tests/e2e/sockets.js URL N   (socket.io-client from tests/js, installed by npm ci)
const path = require('path');
const { io } = require(path.join(__dirname, '..', 'js', 'node_modules', 'socket.io-client'));

const [url, count] = [process.argv[2], Number(process.argv[3])];
if (!url || !(count > 0 && count <= 1000)) {
  console.error('usage: sockets.js URL N (1..1000)');
  process.exit(2);
}
const sockets = [];
let connected = 0;
const timer = setTimeout(() => {
  console.error(`only ${connected} of ${count} connected within 30 s`);
  process.exit(1);
}, 30000);
for (let i = 0; i < count; i += 1) {
  const s = io(url, { transports: ['websocket'], reconnection: false });
  s.once('connect', () => {
    connected += 1;
    if (connected === count) {
      clearTimeout(timer);
      console.log(`connected ${count}`);
    }
  });
  s.on('connect_error', (e) => console.error(`connect_error: ${e.message}`));
  sockets.push(s);
}
process.on('SIGTERM', () => {
  for (const s of sockets) s.close();
  process.exit(0);
});
