/**
 * Snapshots shaped exactly as the broker's gpu_snapshot and the server extension send them
 * (docs/interfaces.md), shared by the view builders' tests.
 */
import { IQuotas, ISnapshot } from '../wire';

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;

/**
 * The broker's ``quotas`` view (broker/views.py's quota_view) for a pool with two teams and a user limit: every
 * user the quota file names is listed under ``users`` with their team, members included (carol).
 */
export function quotas(): IQuotas {
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
      { user: 'bob', team: 'ml', limit: null, priority: 0, held: 1.25 },
      { user: 'carol', team: 'viz', limit: null, priority: 0, held: 0 }
    ]
  };
}

/** A snapshot shaped as GET api/snapshot sends it: two users on three virtual GPUs, two queued requests. */
export function snapshot(): ISnapshot {
  return {
    state: 'ok',
    me: 'alice',
    time: 1000,
    pool: {
      address: 'tcp://127.0.0.1:8786',
      embedded: true,
      scalable: true,
      workers: 2,
      virtual: true,
      default_fraction: 0.25
    },
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
          {
            id: 'L2',
            user: 'bob',
            notebook: 'b.ipynb',
            cell: null,
            fraction: 0.5,
            bytes: 8 * GiB,
            bytes_on_gpu: 8 * GiB,
            isolation: 'none',
            state: 'running',
            started: 900
          },
          {
            id: 'L1',
            user: 'alice',
            notebook: 'analysis.ipynb',
            cell: 'train',
            fraction: 0.25,
            bytes: 4 * GiB,
            bytes_on_gpu: 4 * GiB,
            isolation: 'allocator-cap',
            state: 'idle',
            started: 880,
            peak_bytes: 3 * GiB
          }
        ]
      },
      {
        id: 'w1#0',
        host: '127.0.0.1',
        index: 1,
        name: 'Virtual GPU 1',
        total_bytes: 16 * GiB,
        leased_bytes: 16 * GiB,
        virtual: true,
        mig: false,
        samples: [],
        leases: [
          {
            id: 'L3',
            user: 'alice',
            notebook: 'gang.ipynb',
            fraction: 1,
            bytes: 32 * GiB,
            bytes_on_gpu: 16 * GiB,
            state: 'running',
            started: 990,
            rank: 0,
            world_size: 2
          }
        ]
      },
      {
        id: 'w2#0',
        host: '127.0.0.1',
        index: 2,
        name: 'Virtual GPU 2',
        total_bytes: 16 * GiB,
        leased_bytes: 16 * GiB,
        virtual: true,
        leases: [
          {
            id: 'L3',
            user: 'alice',
            notebook: 'gang.ipynb',
            fraction: 1,
            bytes: 32 * GiB,
            bytes_on_gpu: 16 * GiB,
            state: 'running',
            started: 990,
            rank: 1,
            world_size: 2
          }
        ]
      }
    ],
    queue: [
      { id: 'R9', user: 'alice', request: '1 GPU', position: 2, reason: 'waiting: behind R7', eta: null, since: 950 },
      {
        id: 'R7',
        user: 'bob',
        request: '0.5 GPU',
        position: 1,
        reason: 'waiting: no GPU has 8.0 GiB free; largest gap 4.0 GiB',
        eta: 1125,
        eta_basis: 'user-cells',
        eta_note: "median of bob's last 12 cells: 40 s",
        since: 940
      }
    ],
    runs: []
  };
}
