/** The one zero-range fallback both file ports share. */
import { describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { RangeZeroer } from '../../src/io/file-port.js';

function harness(fail: number | null) {
  const calls: string[] = [];
  const disk = Buffer.alloc(3 << 20, 0xaa);
  const zeroer = new RangeZeroer(
    (offset, length) => {
      calls.push(`zero-range ${offset}+${length}`);
      if (fail !== null) throw new NbddError(fail, 'refused');
      disk.fill(0, offset, offset + length);
    },
    async (buf, offset) => {
      calls.push(`write ${offset}+${buf.length}`);
      buf.copy(disk, offset);
    },
  );
  return { calls, disk, zeroer };
}

describe('RangeZeroer', () => {
  it('uses ZERO_RANGE while the filesystem takes it', async () => {
    const h = harness(null);
    await h.zeroer.zero(4096, 8192);
    expect(h.calls).toEqual(['zero-range 4096+8192']);
    expect(h.disk.subarray(4096, 12288).every((b) => b === 0)).toBe(true);
    expect(h.disk[4095]).toBe(0xaa);
  });

  it('after ENOTSUP (tmpfs) or EINVAL writes zero bytes in chunks, and stops asking', async () => {
    for (const errno of [Errno.ENOTSUP, Errno.EINVAL]) {
      const h = harness(errno);
      const len = (2 << 20) + 512;
      await h.zeroer.zero(512, len);
      expect(h.calls).toEqual(['zero-range 512+2097664', 'write 512+1048576', 'write 1049088+1048576', 'write 2097664+512']);
      expect(h.disk.subarray(512, 512 + len).every((b) => b === 0)).toBe(true);
      expect(h.disk[512 + len]).toBe(0xaa);
      h.calls.length = 0;
      await h.zeroer.zero(0, 100);
      expect(h.calls).toEqual(['write 0+100']);
    }
  });

  it('passes other errors on without falling back', async () => {
    const h = harness(Errno.EIO);
    await expect(h.zeroer.zero(0, 4096)).rejects.toMatchObject({ errno: Errno.EIO });
    expect(h.calls).toEqual(['zero-range 0+4096']);
    expect(h.disk[0]).toBe(0xaa);
  });
});
