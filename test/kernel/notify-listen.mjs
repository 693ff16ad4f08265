// A $NOTIFY_SOCKET for the kernel tier: node notify-listen.mjs SOCKET OUT.json
// Binds SOCKET (AF_UNIX datagram), and at the first READY=1 records, in that same instant, what a
// user would see: whether the device named in STATUS= has its size and its partitions' nodes.
// Writes every message and those checks to OUT.json, and exits after READY (or after 120 s).
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import koffi from 'koffi';

const [socketPath, out] = process.argv.slice(2);
const lib = koffi.load('libc.so.6');
const socket = lib.func('int socket(int, int, int)');
const bind = lib.func('int bind(int, const void *, uint32_t)');
const recv = lib.func('int64_t recv(int, _Out_ void *, size_t, int)');
const fd = socket(1, 2, 0);
const name = Buffer.from(socketPath);
const addr = Buffer.alloc(3 + name.length);
addr.writeUInt16LE(1, 0);
name.copy(addr, 2);
if (bind(fd, addr, addr.length) !== 0) throw new Error(`bind ${socketPath}`);
writeFileSync(`${out}.bound`, 'ok');

const messages = [];
const deadline = Date.now() + 120_000;
const buf = Buffer.alloc(4096);
for (;;) {
  const n = recv(fd, buf, buf.length, 0x40 /* MSG_DONTWAIT */);
  if (n > 0) {
    const fields = Object.fromEntries(buf.subarray(0, n).toString().split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    const entry = { fields };
    if (fields.READY === '1') {
      const dev = /\/dev\/(\w+)/.exec(fields.STATUS ?? '')?.[1];
      entry.device = dev;
      entry.sizeSectors = dev ? Number(readFileSync(`/sys/block/${dev}/size`, 'utf8')) : null;
      entry.partitions = dev ? readdirSync(`/sys/block/${dev}`).filter((e) => e.startsWith(dev)).sort() : [];
      entry.nodes = entry.partitions.filter((p) => existsSync(`/dev/${p}`));
    }
    messages.push(entry);
    if (fields.READY === '1') break;
    continue;
  }
  if (Date.now() > deadline) break;
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
}
writeFileSync(out, JSON.stringify(messages));
