import { describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { LineSplitter, RPC_ERROR, checkParams, handleLine, type MethodTable } from '../../src/control/jsonrpc.js';

const methods: MethodTable<string> = {
  echo: { params: { text: 'string', times: 'integer?' }, handler: (p, ctx) => `${ctx}:${String(p.text).repeat((p.times as number) ?? 1)}` },
  fail: { params: {}, handler: () => { throw new NbddError(Errno.ENOENT, 'no such thing'); } },
  crash: { params: {}, handler: () => { throw new TypeError('oops'); } },
  nothing: { params: {}, handler: async () => undefined },
};

const call = async (line: string) => {
  const out = await handleLine(line, methods, 'ctx');
  return out === null ? null : JSON.parse(out);
};

describe('JSON-RPC 2.0 dispatch', () => {
  it('answers requests and stays silent for notifications', async () => {
    expect(await call('{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"ab","times":2}}')).toEqual({ jsonrpc: '2.0', id: 1, result: 'ctx:abab' });
    expect(await call('{"jsonrpc":"2.0","id":"x","method":"nothing"}')).toEqual({ jsonrpc: '2.0', id: 'x', result: null });
    expect(await call('{"jsonrpc":"2.0","method":"echo","params":{"text":"a"}}')).toBeNull();
    expect(await call('{"jsonrpc":"2.0","method":"nope"}')).toBeNull(); // notifications get no errors either
  });

  it('uses the spec error codes', async () => {
    const code = async (line: string) => (await call(line)).error.code;
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo"')).toBe(RPC_ERROR.PARSE_ERROR);
    expect(await code('"just a string"')).toBe(RPC_ERROR.INVALID_REQUEST);
    expect(await code('{"jsonrpc":"1.0","id":1,"method":"echo"}')).toBe(RPC_ERROR.INVALID_REQUEST);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":5}')).toBe(RPC_ERROR.INVALID_REQUEST);
    expect(await code('{"jsonrpc":"2.0","id":{},"method":"echo"}')).toBe(RPC_ERROR.INVALID_REQUEST);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo","params":3}')).toBe(RPC_ERROR.INVALID_REQUEST);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"nope"}')).toBe(RPC_ERROR.METHOD_NOT_FOUND);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"toString"}')).toBe(RPC_ERROR.METHOD_NOT_FOUND);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":1}}')).toBe(RPC_ERROR.INVALID_PARAMS);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo","params":["a"]}')).toBe(RPC_ERROR.INVALID_PARAMS);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"a","extra":1}}')).toBe(RPC_ERROR.INVALID_PARAMS);
    expect(await code('{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"a","times":-1}}')).toBe(RPC_ERROR.INVALID_PARAMS);
    expect(await call('{"jsonrpc":"2.0","id":7,"method":"fail"}')).toEqual({
      jsonrpc: '2.0',
      id: 7,
      error: { code: RPC_ERROR.OPERATION_FAILED, message: 'no such thing', data: { errno: 'ENOENT' } },
    });
    expect((await call('{"jsonrpc":"2.0","id":8,"method":"crash"}')).error).toMatchObject({ code: RPC_ERROR.INTERNAL_ERROR, message: 'internal error' });
  });

  it('handles batches as the spec says', async () => {
    expect(await call('[]')).toMatchObject({ id: null, error: { code: RPC_ERROR.INVALID_REQUEST } });
    expect(await call('[1,2]')).toEqual([
      { jsonrpc: '2.0', id: null, error: { code: RPC_ERROR.INVALID_REQUEST, message: 'a request must be an object' } },
      { jsonrpc: '2.0', id: null, error: { code: RPC_ERROR.INVALID_REQUEST, message: 'a request must be an object' } },
    ]);
    const mixed = await call(
      '[{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"a"}},{"jsonrpc":"2.0","method":"echo","params":{"text":"n"}},{"jsonrpc":"2.0","id":2,"method":"nope"}]',
    );
    expect(mixed).toEqual([
      { jsonrpc: '2.0', id: 1, result: 'ctx:a' },
      { jsonrpc: '2.0', id: 2, error: { code: RPC_ERROR.METHOD_NOT_FOUND, message: "method 'nope' not found" } },
    ]);
    expect(await call('[{"jsonrpc":"2.0","method":"nothing"}]')).toBeNull();
    expect((await call(JSON.stringify(new Array(300).fill({ jsonrpc: '2.0', method: 'nothing' })))).error.code).toBe(RPC_ERROR.INVALID_REQUEST);
  });

  it('checkParams refuses names inherited from Object.prototype, as any unknown name', () => {
    for (const line of ['{"__proto__":"x"}', '{"constructor":"x"}', '{"toString":"x"}', '{"hasOwnProperty":1}']) {
      expect(() => checkParams(JSON.parse(line), { name: 'string?' }), line).toThrow(/unknown parameter/);
    }
  });

  it('checkParams accepts omitted params only when all are optional', () => {
    expect(checkParams(undefined, { a: 'string?' })).toEqual({});
    expect(() => checkParams(undefined, { a: 'string' })).toThrow(/missing/);
    expect(() => checkParams({ a: [1] }, { a: 'string[]' })).toThrow(/string\[\]/);
    expect(() => checkParams({ a: 1.5 }, { a: 'integer' })).toThrow(/integer/);
  });
});

describe('LineSplitter', () => {
  it('yields the same lines however the stream is split', () => {
    const text = Buffer.from('{"a":1}\r\n\n{"b":"é"}\n{"c":2}\npartial');
    for (let cut = 0; cut <= text.length; cut++) {
      for (let cut2 = cut; cut2 <= text.length; cut2 += 3) {
        const s = new LineSplitter(100);
        const out = [...s.push(text.subarray(0, cut)), ...s.push(text.subarray(cut, cut2)), ...s.push(text.subarray(cut2))];
        expect(out, `cuts ${cut},${cut2}`).toEqual([{ line: '{"a":1}' }, { line: '{"b":"é"}' }, { line: '{"c":2}' }]);
      }
    }
  });

  it('reports an over-long line once, discards it through its newline and carries on', () => {
    const s = new LineSplitter(10);
    expect(s.push(Buffer.from('0123456789'))).toEqual([]);
    expect(s.push(Buffer.from('abc'))).toEqual([]);
    expect(s.push(Buffer.from('def\nok\n'))).toEqual([{ tooLong: 16 }, { line: 'ok' }]);
    expect(s.push(Buffer.from('0123456789\n'))).toEqual([{ line: '0123456789' }]);
  });

  it('does not keep references to chunks a socket may reuse', () => {
    const s = new LineSplitter(100);
    const chunk = Buffer.from('abc');
    s.push(chunk);
    chunk.fill(0x78);
    expect(s.push(Buffer.from('\n'))).toEqual([{ line: 'abc' }]);
  });
});
