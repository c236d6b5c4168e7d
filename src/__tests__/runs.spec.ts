/** Scale-out runs: per-rank progress and the loss curve, from summaries or the broker's report streams. */
import { runView, runViews } from '../views/runs';

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
      [1, 0.5, '5/10 steps · loss 0.500']
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
    expect(run.ranks[0].label).toBe('3/12 steps · loss 1.00');
  });
});

describe('runs as the panel lists them', () => {
  const reports = (steps: number[], total: number) =>
    steps.map((step, i) => ({ step, time: 100 + i, metrics: { total, loss: 1 / (step + 1) } }));

  it('lists every run of a cell as a run of its own, newest first, with its start and duration', () => {
    const runs = runViews(
      [
        { id: 'fit-k1-aaaaaa', cell: 'fit', state: 'done', started: 100, ended: 108, world_size: 1 },
        { id: 'fit-k1-bbbbbb', cell: 'fit', state: 'running', started: 200, world_size: 1, notebook: '/h/a.ipynb' },
        { id: 'fit-k1-cccccc', cell: 'fit', state: 'done', started: 150, ended: 190, resumes: 'fit-k1-aaaaaa' }
      ],
      'me',
      230
    );
    expect(runs.map(r => r.id)).toEqual(['fit-k1-bbbbbb', 'fit-k1-cccccc', 'fit-k1-aaaaaa']);
    expect(runs[0].subtitle).toMatch(/^a\.ipynb · started \d\d:\d\d:\d\d · running for 30s$/);
    expect(runs[1].subtitle).toMatch(/started \d\d:\d\d:\d\d · took 40s · resumes fit-k1-aaaaaa$/);
  });

  it("shows a finished run's real last step: a loop counting from 0 ends at N/N", () => {
    // report(step=i, total=45) for i in range(45): the panel said "step 44/45" for a run that was done
    const zeroBased = runView({ id: 'r', state: 'done', ranks: { '0': reports([0, 10, 20, 30, 44], 45) } }, 'x');
    expect(zeroBased.ranks[0].label).toBe('45/45 steps · loss 0.0222');
    expect(zeroBased.ranks[0].progress).toBe(1);
    // a resumed run's first step is not 0, but it ended at the last index: done too
    const resumed = runView({ id: 'r', state: 'done', ranks: { '0': reports([30, 44], 45) } }, 'x');
    expect(resumed.ranks[0].label).toBe('45/45 steps · loss 0.0222');
    const oneBased = runView({ id: 'r', state: 'running', ranks: { '0': reports([1, 20], 40) } }, 'x');
    expect(oneBased.ranks[0].label).toBe('20/40 steps · loss 0.0476');
  });
});
