/** The usage history behind the charts, and how a chart draws it (axes in time and value). */
import { chartPoints, chartSpan } from '../components/TimeChart';
import { segmentWhere } from '../views/gpus';
import { UsageHistory } from '../views/history';
import { ISnapshot } from '../wire';
import { GiB } from './fixtures';

function snap(time: number, samples: number[], leases: { user: string; gib: number }[]): ISnapshot {
  return {
    state: 'ok',
    me: 'alice',
    time,
    pool: {},
    queue: [],
    gpus: [
      {
        id: 'w#0',
        index: 0,
        total_bytes: 16 * GiB,
        samples: samples.map(t => ({ t, utilization: t % 100, memory_used_bytes: 8 * GiB })),
        leases: leases.map((l, i) => ({ id: `L${i}`, user: l.user, bytes: l.gib * GiB, bytes_on_gpu: l.gib * GiB }))
      }
    ]
  };
}

describe('UsageHistory', () => {
  it("keeps each GPU's samples across snapshots, once each, within its window", () => {
    const h = new UsageHistory(100);
    h.add(snap(10, [8, 9, 10], []));
    h.add(snap(11, [9, 10, 11], [])); // overlaps the first: merged by time
    expect(h.gpu('w#0').util).toEqual([
      [8, 8],
      [9, 9],
      [10, 10],
      [11, 11]
    ]);
    expect(h.gpu('w#0').mem[0]).toEqual([8, 50]); // percent of the GPU
    h.add(snap(150, [150], []));
    expect(h.gpu('w#0').util).toEqual([[150, 50]]); // older than the window: gone
  });

  it('records the GPUs each user held at each snapshot, most held first', () => {
    const h = new UsageHistory();
    h.add(snap(10, [], [{ user: 'bob', gib: 4 }]));
    h.add(
      snap(
        11,
        [],
        [
          { user: 'bob', gib: 4 },
          { user: 'alice', gib: 16 }
        ]
      )
    );
    h.add(snap(12, [], []));
    expect(h.users()).toEqual([
      {
        user: 'alice',
        points: [
          [10, 0],
          [11, 1],
          [12, 0]
        ]
      },
      {
        user: 'bob',
        points: [
          [10, 0.25],
          [11, 0.25],
          [12, 0]
        ]
      }
    ]);
  });
});

describe('charts', () => {
  it('span at least a minute and at most the window, ending now', () => {
    expect(chartSpan([[[95, 1]]], 100, 900)).toEqual([40, 100]);
    expect(chartSpan([[[0, 1]]], 1000, 900)).toEqual([100, 1000]);
  });

  it('draw values on the time axis, clipped to the y range, steps held until now', () => {
    expect(
      chartPoints(
        [
          [0, 0],
          [30, 50],
          [60, 200]
        ],
        0,
        60,
        100
      )
    ).toBe('0.0,80.0 150.0,40.0 300.0,0.0');
    expect(
      chartPoints(
        [
          [0, 1],
          [30, 0]
        ],
        0,
        60,
        1,
        true
      )
    ).toBe('0.0,0.0 150.0,0.0 150.0,80.0 300.0,80.0');
  });
});

describe('lease rows', () => {
  it("say which rank of a --workers run a lease is, so one cell's leases stay apart", () => {
    const base = {
      leaseId: 'L1',
      user: 'me',
      mine: true,
      notebook: '/home/me/02-scale-out.ipynb',
      cell: 'spirals-2',
      fraction: 0.25,
      bytes: 4 * GiB,
      share: 0.25,
      isolation: 'none',
      state: 'running',
      preemptible: false
    };
    expect(segmentWhere({ ...base, rank: 'rank 1 of 2' })).toBe('02-scale-out.ipynb › spirals-2 · rank 1 of 2');
    expect(segmentWhere({ ...base, rank: null })).toBe('02-scale-out.ipynb › spirals-2');
  });
});
