/**
 * A progress line on stderr while a terminal watches (bytes, rate, ETA), redrawn at most every
 * 200 ms; nothing without a TTY or when turned off.
 */
import { formatSize } from '../core/units.js';

export class Progress {
  private readonly started = Date.now();
  private last = 0;
  private readonly on: boolean;

  constructor(
    private readonly label: string,
    private readonly total: number,
    enabled: boolean,
  ) {
    this.on = enabled && !!process.stderr.isTTY;
  }

  update(done: number): void {
    if (!this.on) return;
    const now = Date.now();
    if (now - this.last < 200 && done < this.total) return;
    this.last = now;
    const seconds = Math.max(0.001, (now - this.started) / 1000);
    const rate = done / seconds;
    const eta = rate > 0 ? Math.ceil((this.total - done) / rate) : 0;
    const pct = this.total > 0 ? Math.floor((done / this.total) * 100) : 100;
    const width = 30;
    const bar = '#'.repeat(Math.floor((pct / 100) * width)).padEnd(width, '.');
    process.stderr.write(`\r${this.label} [${bar}] ${pct}% ${formatSize(done)}/${formatSize(this.total)} ${formatSize(rate)}/s ETA ${eta}s\x1b[K`);
  }

  done(): void {
    if (!this.on) return;
    this.update(this.total);
    process.stderr.write('\n');
  }
}
