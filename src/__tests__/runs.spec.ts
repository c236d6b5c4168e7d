/** Scale-out runs: per-rank progress and the loss curve, from summaries or the broker's report streams. */
import { runView } from '../views/runs';

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
