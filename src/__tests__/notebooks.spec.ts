/**
 * Notebook paths: a kernel of this server reports its notebook as an absolute path on its machine
 * (JPY_SESSION_NAME); the panel shows, and "go to cell" opens, the server's document path instead.
 */
import { ISnapshot } from '../wire';
import { withServerNotebookPaths } from '../notebooks';

function snapshot(): ISnapshot {
  return {
    state: 'ok',
    me: 'alice',
    time: 1000,
    pool: { embedded: true, workers: 1 },
    gpus: [
      {
        id: 'w0:0',
        index: 0,
        total_bytes: 16,
        leases: [
          { id: 'L1', user: 'alice', kernel: 'k-here', notebook: '/srv/root/project/train.ipynb', cell: 'fit' },
          { id: 'L2', user: 'bob', kernel: 'k-elsewhere', notebook: '/home/bob/eval.ipynb', cell: null }
        ]
      },
      { id: 'w0:1', index: 1, total_bytes: 16 }
    ],
    queue: [
      {
        id: 'R3',
        user: 'alice',
        kernel: 'k-here',
        notebook: '/srv/root/project/train.ipynb',
        request: '1 GPU',
        position: 1,
        reason: 'no GPU has 16.0 GiB free'
      },
      { id: 'R4', user: 'bob', request: '0.5 GPU', position: 2, reason: 'behind R3' }
    ],
    runs: []
  };
}

const paths: Record<string, string> = { 'k-here': 'project/train.ipynb' };
const pathOf = (kernel: string) => paths[kernel];

describe('withServerNotebookPaths', () => {
  it("uses this server's session path for its kernels' leases and requests", () => {
    const out = withServerNotebookPaths(snapshot(), pathOf);
    if (out.state !== 'ok') {
      throw new Error('state');
    }
    expect(out.gpus[0].leases!.map(l => l.notebook)).toEqual(['project/train.ipynb', '/home/bob/eval.ipynb']);
    expect(out.queue.map(q => q.notebook)).toEqual(['project/train.ipynb', undefined]);
    expect(out.gpus[0].leases![0].cell).toBe('fit');
    expect(out.gpus[1].leases).toBeUndefined();
  });

  it('leaves the snapshot untouched when no kernel is this server’s', () => {
    const input = snapshot();
    expect(withServerNotebookPaths(input, () => undefined)).toBe(input);
    const none: ISnapshot = { state: 'no-pool', me: 'alice' };
    expect(withServerNotebookPaths(none, pathOf)).toBe(none);
  });

  it('does not mutate the snapshot it is given', () => {
    const input = snapshot();
    withServerNotebookPaths(input, pathOf);
    expect(input.state === 'ok' && input.gpus[0].leases![0].notebook).toBe('/srv/root/project/train.ipynb');
  });
});
