/** Snapshot → view model: the rules the panel shows users, on snapshots shaped as the broker sends them. */
import { statusText } from '../views/status';
import { buildViewModel } from '../views/viewmodel';
import { ISnapshot } from '../wire';
import { snapshot } from './fixtures';

describe('buildViewModel', () => {
  it('maps the non-ok states', () => {
    expect(buildViewModel(null, 0).state).toBe('loading');
    const noPool = buildViewModel({ state: 'no-pool', me: 'alice' }, 0);
    expect([noPool.state, noPool.me, noPool.gpus]).toEqual(['no-pool', 'alice', []]);
    const down = buildViewModel({ state: 'unreachable', error: 'Timed out', address: 'tcp://x:1' }, 0);
    expect([down.state, down.error, down.address]).toEqual(['unreachable', 'Timed out', 'tcp://x:1']);
  });

  it('shows the Scale button only to users the pool lets scale', () => {
    const withScale = (canScale: boolean, users: string[]): ISnapshot => {
      const snap = snapshot() as Extract<ISnapshot, { state: 'ok' }>;
      return { ...snap, pool: { ...snap.pool, can_scale: canScale, scale_users: users } };
    };
    expect(buildViewModel(withScale(false, ['admin']), 5000).scalable).toBe(false);
    expect(buildViewModel(withScale(true, ['alice']), 5000).scalable).toBe(true);
  });

  it('computes my share, my sessions (one per lease across GPUs) and the pool totals', () => {
    const vm = buildViewModel(snapshot(), 5000);
    expect(vm.state).toBe('ok');
    expect(vm.virtual).toBe(true);
    expect(vm.scalable).toBe(true);
    expect(vm.defaultFraction).toBe(0.25);
    // 0.25 of GPU 0 + all of GPUs 1 and 2 (a two-rank gang)
    expect(vm.myShare).toBe(2.25);
    expect(vm.poolTotal).toBe(3);
    expect(vm.poolLeased).toBe(2.75);
    expect(vm.sessions.map(s => [s.id, s.gpus, s.notebook, s.cell])).toEqual([
      ['L1', ['0@127.0.0.1'], 'analysis.ipynb', 'train'],
      ['L3', ['1@127.0.0.1', '2@127.0.0.1'], 'gang.ipynb', null]
    ]);
    // elapsed from the snapshot's clock (1000), not the browser's (5000)
    expect(vm.sessions[0].elapsed).toBe('2m 00s');
    expect(vm.sessions[0].peak).toBe('3.0 GiB');
  });

  it('orders the queue by position and marks my requests', () => {
    const vm = buildViewModel(snapshot(), 0);
    expect(vm.queue.map(q => [q.position, q.id, q.mine, q.eta, q.waited])).toEqual([
      [1, 'R7', false, '2m 05s', '1m 00s'],
      [2, 'R9', true, 'unknown', '50s']
    ]);
    expect(vm.myQueued).toBe(1);
    // what the estimate rests on, in the broker's words
    expect(vm.queue.map(q => q.etaNote)).toEqual(["median of bob's last 12 cells: 40 s", null]);
  });

  it('lists my sessions waiting in host memory, and only mine', () => {
    const snap = snapshot() as Extract<ISnapshot, { state: 'ok' }>;
    const vm = buildViewModel(
      {
        ...snap,
        in_host_memory: [
          {
            id: 'L4',
            user: 'alice',
            notebook: 'analysis.ipynb',
            cell: 'train',
            state: 'saved',
            saved: ['net', 't', 'torch'],
            lost: ['steps'],
            bytes: 64 * 2 ** 20,
            since: 880,
            move_seconds: 0.42,
            reason: "suspended after 312 s idle: bob's cell was waiting for the GPU"
          },
          { id: 'L5', user: 'alice', notebook: null, state: 'pending', since: 995 },
          { id: 'L6', user: 'bob', state: 'saved', saved: ['x'], since: 900 },
          { id: 'L7', user: 'alice', state: 'saved', saved: ['x'], bytes: 2 ** 20, standby: true, move_seconds: 0.01 }
        ]
      },
      5000
    );
    expect(vm.inHostMemory.map(p => [p.id, p.what, p.since, p.lost])).toEqual([
      ['L4', '3 variables, 64.0 MiB, moved in 0.4 s', '2m 00s', ['steps']],
      ['L5', 'being moved to host memory', '5s', []],
      ['L7', '1 variable, 1.0 MiB, moved at once from its standby copy', '–', []]
    ]);
    expect(vm.inHostMemory[0].reason).toContain('suspended after 312 s idle');
    expect(buildViewModel(snapshot(), 0).inHostMemory).toEqual([]);
  });

  it('lets the caller override who I am', () => {
    const vm = buildViewModel(snapshot(), 0, 'bob');
    expect(vm.sessions.map(s => s.id)).toEqual(['L2']);
    expect(vm.myShare).toBe(0.5);
  });
});

describe('statusText', () => {
  it('says my share and my queue position', () => {
    expect(statusText(buildViewModel(snapshot(), 0))).toBe('GPU: 2.25 of 3 · 1 queued (#2)');
    expect(statusText(buildViewModel({ state: 'no-pool' }, 0))).toBe('GPU: no pool');
    expect(statusText(buildViewModel({ state: 'unreachable' }, 0))).toBe('GPU: pool unreachable');
  });
});
