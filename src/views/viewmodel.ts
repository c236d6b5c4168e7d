/**
 * The whole panel's view model from one snapshot: what every section draws, already worded.
 *
 * Nothing here touches JupyterLab, the DOM or the network, so what the panel shows (what counts as "mine",
 * how a lease's share of a GPU reads) is unit-tested with jest. Rules the broker owns (right-sizing, team
 * membership) arrive in the snapshot and are shown as sent; see src/wire.ts.
 */
import { validFraction } from '../validate';
import { ISnapshot } from '../wire';
import { IGpuView, IHostGroup, gpuView, hostGroups, poolShares } from './gpus';
import { IClusterView, clusterView } from './jobs';
import { IParkedView, myParked } from './parked';
import { IQueueView, queueViews } from './queue';
import { IQuotaView, quotaView } from './quotas';
import { IRunView, runViews } from './runs';
import { ISessionView, mySessions } from './sessions';

export interface IViewModel {
  state: 'loading' | 'no-pool' | 'unreachable' | 'ok';
  error: string | null;
  address: string | null;
  me: string;
  virtual: boolean;
  scalable: boolean;
  embedded: boolean;
  workers: number;
  defaultFraction: number | null;
  gpus: IGpuView[];
  /** The GPUs by machine (one group per host, in the broker's order); drawn as groups when there are several. */
  hostGroups: IHostGroup[];
  /** The cluster manager behind the Scale button and its jobs on their way or ended; null: none to show. */
  cluster: IClusterView | null;
  queue: IQueueView[];
  sessions: ISessionView[];
  /** The pool's administrator (a JupyterHub admin): ``sessions`` holds every user's, each with a Cancel. */
  admin: boolean;
  /** My sessions whose variables wait in host memory; my next ``%%gpu`` cell there brings them back. */
  inHostMemory: IParkedView[];
  /** Scale-out runs, newest first. */
  runs: IRunView[];
  /** The pool's quotas as they concern the panel; null when the broker sends none (an older broker). */
  quotas: IQuotaView | null;
  /** The pool checks tokens and this server has none to send: its cancels will be refused. */
  tokenMissing: boolean;
  /** A pool shared by several people whose sessions do not run as their users: they are not isolated. */
  notIsolated: boolean;
  /** My leased memory in GPU-equivalents (sum over GPUs of my bytes / that GPU's total). */
  myShare: number;
  myQueued: number;
  /** Whole pool, in GPU-equivalents: leased and total. */
  poolLeased: number;
  poolTotal: number;
}

/** Everything but the state and who I am, for the states that have no pool to show. */
const EMPTY: Omit<IViewModel, 'state' | 'me'> = {
  error: null,
  address: null,
  virtual: false,
  scalable: false,
  embedded: false,
  workers: 0,
  defaultFraction: null,
  gpus: [],
  hostGroups: [],
  cluster: null,
  queue: [],
  sessions: [],
  admin: false,
  inHostMemory: [],
  runs: [],
  quotas: null,
  tokenMissing: false,
  notIsolated: false,
  myShare: 0,
  myQueued: 0,
  poolLeased: 0,
  poolTotal: 0
};

/**
 * The whole view model from one snapshot. ``now`` is in seconds (like the snapshot's ``time``); elapsed
 * times use the snapshot's own clock when present so that a skewed browser clock cannot show negative ages.
 */
export function buildViewModel(snapshot: ISnapshot | null, nowSeconds: number, meOverride?: string): IViewModel {
  if (!snapshot) {
    return { ...EMPTY, state: 'loading', me: meOverride ?? '' };
  }
  const me = meOverride ?? snapshot.me ?? '';
  if (snapshot.state === 'no-pool') {
    return { ...EMPTY, state: 'no-pool', me };
  }
  if (snapshot.state === 'unreachable') {
    return {
      ...EMPTY,
      state: 'unreachable',
      me,
      error: snapshot.error ?? 'the pool does not answer',
      address: snapshot.address ?? null
    };
  }
  const now = typeof snapshot.time === 'number' ? snapshot.time : nowSeconds;
  const gpus = (snapshot.gpus ?? []).map(g => gpuView(g, me));
  const shares = poolShares(gpus);
  const queue = queueViews(snapshot.queue ?? [], me, now);
  const pool = snapshot.pool ?? {};
  return {
    state: 'ok',
    me,
    error: null,
    address: pool.address ?? null,
    virtual: !!pool.virtual || gpus.some(g => g.badge === 'virtual'),
    // the Scale button is for users the pool lets scale (older servers send no can_scale: scalable decides)
    scalable: pool.can_scale ?? !!pool.scalable,
    embedded: !!pool.embedded,
    workers: pool.workers ?? 0,
    defaultFraction: validFraction(pool.default_fraction),
    gpus,
    hostGroups: hostGroups(gpus, snapshot.hosts ?? []),
    cluster: clusterView(pool.cluster, now),
    queue,
    sessions: mySessions(snapshot.gpus ?? [], me, now, !!snapshot.viewer?.admin),
    admin: !!snapshot.viewer?.admin,
    inHostMemory: myParked(snapshot.in_host_memory ?? [], me, now),
    runs: runViews(snapshot.runs ?? [], me, now),
    quotas: quotaView(snapshot.quotas, me, shares.myShare),
    tokenMissing: ['tokens', 'hub'].includes(snapshot.quotas?.identity ?? '') && snapshot.token_set === false,
    notIsolated: !pool.embedded && !!pool.shared && pool.users_isolated === false,
    myShare: shares.myShare,
    myQueued: queue.filter(q => q.mine).length,
    poolLeased: shares.poolLeased,
    poolTotal: shares.poolTotal
  };
}
