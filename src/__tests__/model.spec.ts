/**
 * The panel's data model: snapshot → view model. These are the rules the panel shows users, so they are
 * tested on snapshots shaped exactly as the broker's gpu_snapshot sends them (docs/interfaces.md).
 */
import {
  IQuotas,
  ISnapshot,
  buildViewModel,
  formatBytes,
  formatDuration,
  formatMemoryOption,
  gpuView,
  myQuotaText,
  notebookLabel,
  myTeamOf,
  quotaView,
  rightSizeHint,
  runView,
  scaleRequest,
  sparklinePoints,
  statusText,
  suggestMemory,
  teamQuotaRow,
  teamQuotaRows,
  usageText,
  validFraction
} from '../model';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/** The broker's ``quotas`` view (broker._quota_view) for a pool with two teams and a user limit. */
function quotas(): IQuotas {
  return {
    configured: true,
    default_team: 'default',
    identity: 'tokens',
    teams: [
      { team: 'viz', guarantee: 0.5, limit: null, priority: 0, held: 0, members: ['carol'] },
      { team: 'ml', guarantee: 1.0, limit: 2.0, priority: 10, held: 1.5, members: ['bob', 'alice'] },
      { team: 'default', guarantee: 0, limit: null, priority: 0, held: 0, members: [] }
    ],
    users: [
      { user: 'alice', team: 'ml', limit: 1.0, priority: 0, held: 0.25 },
      { user: 'bob', team: 'ml', limit: null, priority: 0, held: 1.25 }
    ]
  };
}

function snapshot(): ISnapshot {
  return {
    state: 'ok',
    me: 'alice',
    time: 1000,
    pool: { address: 'tcp://127.0.0.1:8786', embedded: true, scalable: true, workers: 2, virtual: true, default_fraction: 0.25 },
    gpus: [
      {
        id: 'w0#0',
        worker: 'tcp://127.0.0.1:40000',
        host: '127.0.0.1',
        index: 0,
        name: 'Virtual GPU 0',
        total_bytes: 16 * GiB,
        leased_bytes: 12 * GiB,
        virtual: true,
        mig: false,
        utilization: 37.5,
        memory_used_bytes: 2 * GiB,
        samples: [
          { t: 998, utilization: 0, memory_used_bytes: 0 },
          { t: 999, utilization: 50, memory_used_bytes: 8 * GiB },
          { t: 1000, utilization: 37.5, memory_used_bytes: 2 * GiB }
        ],
        leases: [
          { id: 'L2', user: 'bob', notebook: 'b.ipynb', cell: null, fraction: 0.5, bytes: 8 * GiB, bytes_on_gpu: 8 * GiB, isolation: 'none', state: 'running', started: 900 },
          { id: 'L1', user: 'alice', notebook: 'analysis.ipynb', cell: 'train', fraction: 0.25, bytes: 4 * GiB, bytes_on_gpu: 4 * GiB, isolation: 'allocator-cap', state: 'idle', started: 880, peak_bytes: 3 * GiB }
        ]
      },
      {
        id: 'w1#0', host: '127.0.0.1', index: 1, name: 'Virtual GPU 1', total_bytes: 16 * GiB, leased_bytes: 16 * GiB,
        virtual: true, mig: false, samples: [],
        leases: [
          { id: 'L3', user: 'alice', notebook: 'gang.ipynb', fraction: 1, bytes: 32 * GiB, bytes_on_gpu: 16 * GiB, state: 'running', started: 990, rank: 0, world_size: 2 }
        ]
      },
      {
        id: 'w2#0', host: '127.0.0.1', index: 2, name: 'Virtual GPU 2', total_bytes: 16 * GiB, leased_bytes: 16 * GiB,
        virtual: true, leases: [
          { id: 'L3', user: 'alice', notebook: 'gang.ipynb', fraction: 1, bytes: 32 * GiB, bytes_on_gpu: 16 * GiB, state: 'running', started: 990, rank: 1, world_size: 2 }
        ]
      }
    ],
    queue: [
      { id: 'R9', user: 'alice', request: '1 GPU', position: 2, reason: 'waiting: behind R7', eta: null, since: 950 },
      { id: 'R7', user: 'bob', request: '0.5 GPU', position: 1, reason: 'waiting: no GPU has 8.0 GiB free; largest gap 4.0 GiB', eta: 1125, since: 940 }
    ],
    runs: []
  };
}

describe('formatBytes', () => {
  it('uses binary units like the Python side', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(16 * GiB)).toBe('16.0 GiB');
    expect(formatBytes(3 * 1024 * GiB)).toBe('3.0 TiB');
    expect(formatBytes(5000 * 1024 * GiB)).toBe('5000.0 TiB');
  });
  it('says ? when unknown', () => {
    expect(formatBytes(null)).toBe('?');
    expect(formatBytes(undefined)).toBe('?');
    expect(formatBytes(NaN)).toBe('?');
  });
});

describe('formatDuration', () => {
  it('reads well at every scale', () => {
    expect(formatDuration(0)).toBe('0s');
    expect(formatDuration(42.9)).toBe('42s');
    expect(formatDuration(185)).toBe('3m 05s');
    expect(formatDuration(2 * 3600 + 7 * 60 + 3)).toBe('2h 07m');
    expect(formatDuration(-5)).toBe('0s');
    expect(formatDuration(null)).toBe('–');
  });
});

describe('gpuView', () => {
  it('splits memory by lease, mine first, with shares of the GPU', () => {
    const vm = gpuView((snapshot() as any).gpus[0], 'alice');
    expect(vm.badge).toBe('virtual');
    expect(vm.title).toBe('Virtual GPU 0');
    expect(vm.host).toBe('127.0.0.1');
    expect(vm.segments.map(s => [s.leaseId, s.user, s.mine, s.share])).toEqual([
      ['L1', 'alice', true, 0.25],
      ['L2', 'bob', false, 0.5]
    ]);
    expect(vm.segments[0].isolation).toBe('allocator-cap');
    expect(vm.freeBytes).toBe(4 * GiB);
    expect(vm.utilSeries).toEqual([0, 50, 37.5]);
    expect(vm.memSeries).toEqual([0, 0.5, 0.125]);
  });
  it('badges MIG slices and leaves real GPUs plain', () => {
    expect(gpuView({ id: 'g', index: 0, total_bytes: GiB, mig: true }, 'x').badge).toBe('MIG');
    expect(gpuView({ id: 'g', index: 0, total_bytes: GiB }, 'x').badge).toBeNull();
  });
  it('counts a lease without bytes_on_gpu by its bytes, and never overflows the bar', () => {
    const vm = gpuView(
      { id: 'g', index: 0, total_bytes: GiB, leases: [{ id: 'L', user: 'u', bytes: 2 * GiB }] },
      'x'
    );
    expect(vm.segments[0].share).toBe(1);
    expect(vm.leasedBytes).toBe(2 * GiB);
    expect(vm.freeBytes).toBe(0);
  });
});

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
  });

  it('lists my sessions waiting in host memory, and only mine', () => {
    const snap = snapshot() as Extract<ISnapshot, { state: 'ok' }>;
    const vm = buildViewModel(
      {
        ...snap,
        in_host_memory: [
          {
            id: 'L4', user: 'alice', notebook: 'analysis.ipynb', cell: 'train', state: 'saved',
            saved: ['net', 't', 'torch'], lost: ['steps'], bytes: 64 * 2 ** 20, since: 880, move_seconds: 0.42,
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

describe('runView', () => {
  it('shows per-rank progress and rank 0 loss curve', () => {
    const run = runView(
      {
        id: 'run1',
        user: 'alice',
        name: 'train',
        world_size: 2,
        ranks: { '1': { rank: 1, step: 5, total: 10, loss: 0.5 }, '0': { rank: 0, progress: 1.7 } },
        metrics: [
          { rank: 0, step: 1, loss: 2.0 },
          { rank: 1, step: 1, loss: 2.1 },
          { rank: 0, step: 2, loss: 1.0 }
        ]
      },
      'alice'
    );
    expect(run.title).toBe('train (2 GPUs)');
    expect(run.mine).toBe(true);
    expect(run.ranks.map(r => [r.rank, r.progress, r.label])).toEqual([
      [0, 1, ''],
      [1, 0.5, 'step 5/10 · loss 0.500']
    ]);
    expect(run.loss).toEqual([2.0, 1.0]);
  });
});

describe("runView on the broker's run record", () => {
  it("summarises each rank's report stream", () => {
    const run = runView(
      {
        id: 'run-abc',
        user: 'alice',
        notebook: 'train.ipynb',
        cell: 'fit',
        world_size: 2,
        attempt: 1,
        state: 'running',
        ranks: {
          '0': [
            { step: 1, time: 1, metrics: { loss: 2.5 } },
            { step: 4, time: 2, metrics: { loss: 1.25 } }
          ],
          '1': [{ step: 2, time: 1, metrics: { loss: 2.4 } }]
        }
      },
      'bob'
    );
    expect(run.title).toBe('fit (2 GPUs)');
    expect(run.mine).toBe(false);
    expect(run.state).toBe('running (retry 1)');
    // no total reported: progress relative to the furthest rank
    expect(run.ranks.map(r => [r.rank, r.progress, r.label])).toEqual([
      [0, 1, 'step 4 · loss 1.25'],
      [1, 0.5, 'step 2 · loss 2.40']
    ]);
    expect(run.loss).toEqual([2.5, 1.25]);
  });
  it('uses a reported total for progress', () => {
    const run = runView({ id: 'r', ranks: { '0': [{ step: 3, metrics: { total: 12, loss: 1 } }] } }, 'x');
    expect(run.ranks[0].progress).toBe(0.25);
    expect(run.ranks[0].label).toBe('step 3/12 · loss 1.00');
  });
});

describe('sparklinePoints', () => {
  it('scales to the box with a fixed max and clips above it', () => {
    expect(sparklinePoints([0, 50, 200], 100, 10, 100)).toBe('0.0,10.0 50.0,5.0 100.0,0.0');
  });
  it('draws nothing for fewer than two points', () => {
    expect(sparklinePoints([3], 100, 10)).toBe('');
    expect(sparklinePoints([], 100, 10)).toBe('');
  });
});

describe('statusText', () => {
  it('says my share and my queue position', () => {
    expect(statusText(buildViewModel(snapshot(), 0))).toBe('GPU: 2.25 of 3 · 1 queued (#2)');
    expect(statusText(buildViewModel({ state: 'no-pool' }, 0))).toBe('GPU: no pool');
    expect(statusText(buildViewModel({ state: 'unreachable' }, 0))).toBe('GPU: pool unreachable');
  });
});

describe('scaleRequest', () => {
  it('builds the api/scale body the server accepts', () => {
    expect(scaleRequest('manual', { n: '3' })).toEqual({ body: { n: 3 } });
    expect(scaleRequest('adaptive', { minimum: '1', maximum: '4' })).toEqual({ body: { minimum: 1, maximum: 4 } });
  });
  it('refuses what the server would refuse, with a reason', () => {
    expect(scaleRequest('manual', { n: '' })).toHaveProperty('error');
    expect(scaleRequest('manual', { n: '1.5' })).toHaveProperty('error');
    expect(scaleRequest('manual', { n: '-1' })).toHaveProperty('error');
    expect(scaleRequest('adaptive', { minimum: '4', maximum: '1' })).toEqual({
      error: 'Minimum (4) must not exceed maximum (1)'
    });
  });
});

describe('validFraction', () => {
  it('accepts fractions in (0, 1] and whole GPU counts', () => {
    expect(validFraction(0.25)).toBe(0.25);
    expect(validFraction(2)).toBe(2);
    expect(validFraction(0)).toBeNull();
    expect(validFraction(1.5)).toBeNull();
    expect(validFraction('0.5')).toBeNull();
  });
});

describe('suggestMemory', () => {
  it('is the smallest power of two at least 1.25 x the peak, never under 256 MiB (rightsizing.py)', () => {
    expect(suggestMemory(0)).toBe(256 * MiB);
    expect(suggestMemory(100 * MiB)).toBe(256 * MiB);
    expect(suggestMemory(205 * MiB)).toBe(512 * MiB); // 256.25 MiB needed
    expect(suggestMemory(Math.round(0.4 * GiB))).toBe(512 * MiB); // floor(1.25 x peak) is exactly 512 MiB
    expect(suggestMemory(600 * MiB)).toBe(GiB);
    expect(suggestMemory(0.8 * GiB)).toBe(GiB); // exactly 1 GiB with headroom: it fits
    expect(suggestMemory(3 * GiB)).toBe(4 * GiB);
    expect(suggestMemory(3.5 * GiB)).toBe(8 * GiB);
  });
  it('writes sizes as the magic reads them', () => {
    expect(formatMemoryOption(256 * MiB)).toBe('256MiB');
    expect(formatMemoryOption(GiB)).toBe('1GiB');
    expect(formatMemoryOption(8 * GiB)).toBe('8GiB');
    expect(formatMemoryOption(1.5 * GiB)).toBe('1.5GiB');
  });
});

describe('rightSizeHint', () => {
  it('suggests a smaller --memory when the peak is under a quarter of the reservation', () => {
    expect(rightSizeHint(Math.round(0.45 * GiB), 8 * GiB)).toBe(
      'used 460.8 MiB of 8.0 GiB: ask --memory 1GiB next time'
    );
    expect(rightSizeHint(1.5 * GiB, 8 * GiB)).toBe('used 1.5 GiB of 8.0 GiB: ask --memory 2GiB next time');
  });
  it('stays quiet without a peak, at a quarter or more, or when the suggestion would not be smaller', () => {
    expect(rightSizeHint(null, 8 * GiB)).toBeNull();
    expect(rightSizeHint(2 * GiB, 8 * GiB)).toBeNull();
    expect(rightSizeHint(7 * GiB, 8 * GiB)).toBeNull();
    expect(rightSizeHint(100 * MiB, 768 * MiB)).toBeNull(); // under 1 GiB reserved: not worth a hint
    expect(rightSizeHint(300 * MiB, GiB + MiB)).toBeNull(); // 512 MiB would do, but that is not under a quarter
    expect(rightSizeHint(10 * MiB, 0)).toBeNull();
  });
  it('says peak of reserved when the peak is known', () => {
    expect(usageText(3 * GiB, 4 * GiB)).toBe('peak 3.0 GiB of 4.0 GiB reserved');
    expect(usageText(null, 4 * GiB)).toBe('4.0 GiB reserved');
  });
});

describe('quotas', () => {
  it("finds my team from my user entry, a team's members, else the default team", () => {
    const q = quotas();
    expect(myTeamOf(q, 'alice')).toBe('ml');
    expect(myTeamOf(q, 'carol')).toBe('viz'); // a member, not listed under users
    expect(myTeamOf(q, 'dave')).toBe('default');
  });

  it('draws held within the guarantee, the borrowed rest, and the guarantee tick on the limit scale', () => {
    const row = teamQuotaRow(quotas().teams![1], true);
    expect(row.text).toBe('1.5 of 1 GPU guaranteed · limit 2');
    expect([row.withinShare, row.overShare, row.guaranteeAt]).toEqual([0.5, 0.25, 0.5]);
    expect(row.over).toBe(true);
    expect(row.members).toEqual(['alice', 'bob']);
  });

  it('scales a team without a limit by the larger of its guarantee and what it holds', () => {
    const within = teamQuotaRow({ team: 't', guarantee: 2, held: 1 }, false);
    expect([within.withinShare, within.overShare, within.guaranteeAt, within.over]).toEqual([0.5, 0, 1, false]);
    const over = teamQuotaRow({ team: 't', guarantee: 1, held: 2 }, false);
    expect([over.withinShare, over.overShare, over.guaranteeAt, over.over]).toEqual([0.5, 0.5, 0.5, true]);
    const empty = teamQuotaRow({ team: 't', guarantee: 0, held: 0 }, false);
    expect([empty.withinShare, empty.overShare, empty.over]).toEqual([0, 0, false]);
  });

  it('lists my team first and leaves out an empty default team unless it is mine', () => {
    expect(teamQuotaRows(quotas(), 'carol').map(r => [r.team, r.mine])).toEqual([
      ['viz', true],
      ['ml', false]
    ]);
    expect(teamQuotaRows(quotas(), 'dave').map(r => [r.team, r.mine])).toEqual([
      ['default', true],
      ['ml', false],
      ['viz', false]
    ]);
  });

  it('gives my own held and limit, falling back to my leases when the broker does not list me', () => {
    const alice = quotaView(quotas(), 'alice', 9)!;
    expect([alice.configured, alice.myTeam, alice.myHeld, alice.myLimit, alice.identity]).toEqual([
      true,
      'ml',
      0.25,
      1,
      'tokens'
    ]);
    expect(myQuotaText(alice)).toBe('0.25 GPU held · your limit 1 GPU');
    const carol = quotaView(quotas(), 'carol', 0)!;
    expect(myQuotaText(carol)).toBe('0 GPU held · no limit of your own');
  });

  it('warns when the pool checks tokens and this server has none to send', () => {
    const snap = snapshot() as any;
    snap.quotas = quotas();
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false); // no token_set: an older server, say nothing
    snap.token_set = false;
    expect(buildViewModel(snap, 0).tokenMissing).toBe(true);
    snap.token_set = true;
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false);
    snap.token_set = false;
    snap.quotas.identity = 'names';
    expect(buildViewModel(snap, 0).tokenMissing).toBe(false);
  });

  it('says not configured for a pool without a quota file, and nothing for a broker without quotas', () => {
    const none = quotaView({ configured: false, teams: [] }, 'alice', 0.5)!;
    expect([none.configured, none.teams]).toEqual([false, []]);
    expect(quotaView(undefined, 'alice', 0)).toBeNull();
  });

  it('reaches the view model with right-sizing and preemptible sessions', () => {
    const snap = snapshot() as any;
    snap.quotas = quotas();
    snap.gpus[0].leases[1].peak_bytes = 512 * MiB; // alice's L1 reserves 4 GiB
    snap.gpus[0].leases[1].preemptible = true;
    const vm = buildViewModel(snap, 0);
    expect(vm.quotas!.teams[0]).toMatchObject({ team: 'ml', mine: true, over: true });
    const l1 = vm.sessions.find(s => s.id === 'L1')!;
    expect(l1.usage).toBe('peak 512.0 MiB of 4.0 GiB reserved');
    expect(l1.rightSize).toBe('used 512.0 MiB of 4.0 GiB: ask --memory 1GiB next time');
    expect(l1.preemptible).toBe(true);
    expect(vm.gpus[0].segments.find(s => s.leaseId === 'L1')!.preemptible).toBe(true);
    // the two-GPU lease gets no --memory suggestion (it sizes one GPU's share)
    const l3 = vm.sessions.find(s => s.id === 'L3')!;
    expect([l3.usage, l3.rightSize, l3.preemptible]).toEqual(['32.0 GiB reserved', null, false]);
  });
});

describe('notebookLabel', () => {
  it('shows the file name of an absolute path and leaves server paths alone', () => {
    expect(notebookLabel('/home/ann/projects/train.ipynb')).toBe('train.ipynb');
    expect(notebookLabel('C:\\Users\\ann\\train.ipynb')).toBe('train.ipynb');
    expect(notebookLabel('work/train.ipynb')).toBe('work/train.ipynb');
    expect(notebookLabel(null)).toBeNull();
  });
});
