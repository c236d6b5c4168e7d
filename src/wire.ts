/**
 * The pool snapshot exactly as GET jupyter-gpu/api/snapshot and the stream websocket send it: the broker's
 * ``gpu_snapshot`` (the TypedDicts of jupyter_gpu/common/protocol.py, built by jupyter_gpu/broker/views.py)
 * plus what the server extension adds (jupyter_gpu/labext/pool_link.py: ``state``, ``me``, ``token_set``,
 * ``pool.can_scale``).
 *
 * Why a module of its own: these types are a contract with Python, not the panel's choice. Each interface
 * names the TypedDict it mirrors, so a field added on one side is easy to find on the other. Every field
 * the broker may leave out is optional here too; the few the panel cannot do without (ids, a GPU's index
 * and size, a queue item's position and reason) are required, as the broker always sends them.
 */

/** protocol.Priority */
export type Priority = 'interactive' | 'batch';

/** protocol.EtaBasis: what an estimated start rests on (broker/estimates.py). */
export type EtaBasis = 'progress' | 'idle' | 'user-cells' | 'pool-cells' | 'unknown';

/** protocol.OffloadState: ``pending`` while the variables are being written, then ``saved``. */
export type OffloadState = 'pending' | 'saved';

/** protocol.Sample: one utilisation / memory sample of a GPU (the broker keeps the last minute or so). */
export interface ISample {
  t: number;
  /** Percent. */
  utilization?: number | null;
  memory_used_bytes?: number | null;
}

/** protocol.OffloadView: where an idle session's variables went when its lease was taken back. */
export interface IOffload {
  state?: OffloadState;
  worker?: string;
  saved?: string[];
  lost?: { name?: string; type?: string; why?: string }[];
  bytes?: number;
  /** Handed over from a standby copy (moving it was a rename). */
  standby?: boolean;
  seconds?: number;
}

/** protocol.LeaseView: a lease as the snapshot lists it under the GPU(s) it holds memory on. */
export interface ILease {
  id: string;
  request?: string;
  user: string;
  kernel?: string;
  worker?: string;
  /** GPU ids: ``<worker>#<index>``. */
  gpus?: string[];
  gpu_indices?: number[];
  bytes?: number | null;
  fraction?: number | null;
  priority?: Priority | null;
  notebook?: string | null;
  cell?: string | null;
  rank?: number | null;
  world_size?: number | null;
  started?: number | null;
  /** protocol.LeaseState; a string here because the panel shows whatever state it is sent. */
  state?: string | null;
  /** protocol.Isolation; a string for the same reason (older workers named their modes differently). */
  isolation?: string | null;
  /** The session's comm address. */
  address?: string | null;
  pid?: number | null;
  cell_started?: number | null;
  peak_bytes?: number | null;
  end_reason?: string | null;
  gpu_utilization?: number | null;
  resident_bytes?: number | null;
  /** Host memory (bytes) and CPU cores booked for it on its machine (issue 24). */
  host_memory?: number;
  cpus?: number;
  preempted?: boolean;
  offload?: IOffload | null;
  team?: string | null;
  /** Granted beyond its team's guarantee: the pool may reclaim it. */
  preemptible?: boolean;
  /** Bytes of this lease on the GPU it is listed under (a lease over several GPUs is listed under each). */
  bytes_on_gpu?: number | null;
  /**
   * The broker's right-sizing hint (``used X of Y: ask --memory Z next time``), null when it has none:
   * the rule is jupyter_gpu/common/rightsizing.py's, applied by broker/views.py, and the panel shows it.
   */
  right_size?: string | null;
}

/** protocol.GpuView: one GPU in a snapshot. */
export interface IGpu {
  id: string;
  worker?: string;
  host?: string;
  index: number;
  uuid?: string;
  name?: string;
  total_bytes: number;
  leased_bytes?: number;
  virtual?: boolean;
  mig?: boolean;
  utilization?: number | null;
  memory_used_bytes?: number | null;
  samples?: ISample[];
  leases?: ILease[];
}

/** protocol.QueueItem: one waiting request, in the policy's order. */
export interface IQueueItem {
  id: string;
  user: string;
  kernel?: string;
  notebook?: string | null;
  cell?: string | null;
  request: string;
  priority?: Priority;
  position: number;
  /** Why it waits, always set. */
  reason: string;
  /** Estimated start (epoch seconds), "not before". */
  eta?: number | null;
  /** What the estimate rests on, and the same in words (why it is unknown, when it is). */
  eta_basis?: EtaBasis | null;
  eta_note?: string | null;
  since?: number | null;
}

/** protocol.ParkedView: a session taken off its GPU whose variables wait in host memory. */
export interface IParked {
  id: string;
  user: string;
  kernel?: string;
  notebook?: string | null;
  cell?: string | null;
  /** ``pending`` while the variables are being written, then ``saved``. */
  state?: OffloadState | null;
  saved?: string[];
  /** Names that could not be kept (not picklable). */
  lost?: string[];
  bytes?: number | null;
  /** The session had copied its variables while idle: moving it was a rename (standby.py). */
  standby?: boolean | null;
  /** Moved to its machine's disk folder to leave host memory to sessions; restored from there. */
  spilled?: boolean | null;
  /** How long moving it off its GPU took (seconds). */
  move_seconds?: number | null;
  since?: number | null;
  reason?: string | null;
}

/** protocol.HostView: one machine of the pool, with its workers' GPUs (the snapshot lists GPUs by host). */
export interface IHost {
  host: string;
  workers?: number;
  /** GPU ids, in the snapshot's order. */
  gpus?: string[];
  total_bytes?: number;
  leased_bytes?: number;
  /** Host memory its workers leave to sessions (bytes; null: one reports none, unbounded). */
  host_memory?: number | null;
  /** ... booked by its leases. */
  host_memory_leased?: number;
  /** ... held by idle sessions' copies of their variables. */
  host_memory_parked?: number;
  /** Idle sessions' copies moved to its disk folder to leave memory to sessions (bytes). */
  host_memory_spilled?: number;
  /** CPU cores its workers leave to sessions (null: unbounded). */
  cpus?: number | null;
  cpus_leased?: number;
}

/** protocol.JobView: a job of the pool's cluster manager (a Slurm job...), with the manager's own words. */
export interface IJob {
  name: string;
  /** The cluster manager's id (a Slurm job id); null where it has none. */
  job_id?: string | null;
  /** The cluster manager's state (Slurm: PENDING, RUNNING, TIMEOUT...), or submitted / running. */
  state?: string;
  /** Its reason for that state (Slurm: Resources, Priority, TimeLimit). */
  reason?: string | null;
  /** Its GPU workers that joined the pool. */
  workers?: number;
  since?: number | null;
  ended?: number | null;
}

/** protocol.ClusterView: the cluster manager behind the Scale button. */
export interface ICluster {
  /** ``slurm``, ``dask`` (any Dask cluster class) or ``embedded``. */
  kind?: string;
  /** Its class, e.g. dask_jobqueue.SLURMCluster. */
  manager?: string;
  gpus_per_job?: number;
  /** GPU workers asked for by a fixed scale; null when adaptive or never scaled. */
  target?: number | null;
  adaptive?: { minimum: number; maximum: number; idle?: number } | null;
  /** Asked for and not ended: pending ones first. */
  jobs?: IJob[];
  /** The latest that ended on their own (walltime, failure), newest first. */
  ended?: IJob[];
}

/** protocol.PoolInfo, plus ``can_scale`` from the server extension. */
export interface IPoolInfo {
  address?: string | null;
  embedded?: boolean;
  /** The pool owns a cluster manager (``%gpu scale`` works). */
  scalable?: boolean;
  /** Set by the server extension: the pool is scalable and this server's user may scale it. */
  can_scale?: boolean;
  /** Who may scale (Dask config jupyter-gpu.scale-users); null: everyone. */
  scale_users?: string[] | null;
  workers?: number;
  virtual?: boolean;
  default_fraction?: number;
  /** The pool checks tokens: several people use it. */
  shared?: boolean;
  /** Every session runs as its user's account (docs/security.md). */
  users_isolated?: boolean;
  /** The cluster manager behind the Scale button and its jobs; null: the pool has none. */
  cluster?: ICluster | null;
}

/** protocol.TeamQuotaView: a team as broker/views.py's ``quota_view`` lists it (GPUs; fractions allowed). */
export interface IQuotaTeam {
  team: string;
  guarantee: number;
  limit?: number | null;
  priority?: number;
  /** GPUs the team's leases hold now. */
  held: number;
  members?: string[];
}

/**
 * protocol.UserQuotaView: a user as ``quota_view`` lists it: everyone the quota file names (team members
 * included) and everyone holding GPUs now, each with the team whose quota holds them.
 */
export interface IQuotaUser {
  user: string;
  team: string;
  limit?: number | null;
  priority?: number;
  held: number;
  /** Her idle sessions' copies booked in host memory (bytes). */
  parked_bytes?: number;
}

/** protocol.QuotasView: ``configured`` is false for a pool without a quota file (the embedded pool). */
export interface IQuotas {
  configured: boolean;
  /** The team of every user the broker does not list (named nowhere, holding nothing). */
  default_team?: string;
  teams?: IQuotaTeam[];
  users?: IQuotaUser[];
  /** ``tokens``: the broker checks JUPYTER_GPU_TOKEN on requests and cancels; ``names``: names are trusted. */
  identity?: 'tokens' | 'names';
}

/** One rank of a scale-out run (``%%gpu --workers N``) summarised: the older, per-rank form of ``ranks``. */
export interface IRunRank {
  rank: number;
  step?: number | null;
  total?: number | null;
  progress?: number | null;
  loss?: number | null;
  state?: string | null;
}

/** A metric point a run reported with ``jupyter_gpu.report(...)``. */
export interface IRunMetric {
  t?: number;
  step?: number;
  rank?: number;
  loss?: number;
  [key: string]: unknown;
}

/** protocol.MetricsItem: one batched report of a rank, as the broker keeps it. */
export interface IRankReport {
  step?: number | null;
  time?: number | null;
  metrics?: Record<string, unknown> | null;
}

/**
 * protocol.RunView: a scale-out run as the broker's ``gpu_run_update`` / ``gpu_run_metrics`` record it:
 * ``ranks`` maps each rank to its stream of reports. A summary per rank (``IRunRank``) is accepted too. Every
 * run of a cell has an id of its own (jupyter_gpu/kernelext/runs.py).
 */
export interface IRun {
  id: string;
  user?: string;
  name?: string | null;
  notebook?: string | null;
  cell?: string | null;
  state?: string;
  world_size?: number;
  attempt?: number;
  ranks?: IRunRank[] | Record<string, IRunRank | IRankReport[]>;
  metrics?: IRunMetric[];
  /** Epoch seconds: when the broker first heard of the run, and when it ended (null while it runs). */
  started?: number | null;
  ended?: number | null;
  /** The earlier run whose checkpoints this one continues (``%%gpu --resume``). */
  resumes?: string | null;
  /** Its ranks' leases, as its kernel declared them (only they may report metrics to it). */
  leases?: string[];
}

/** What GET jupyter-gpu/api/snapshot and the stream websocket send: protocol.Snapshot with a ``state``. */
export type ISnapshot =
  | { state: 'no-pool'; me?: string }
  | { state: 'unreachable'; error?: string; address?: string; me?: string }
  | {
      state: 'ok';
      /** This server's user (pool_link.py). */
      me?: string;
      time: number;
      pool: IPoolInfo;
      gpus: IGpu[];
      /** The machines, in the order their GPUs are listed (older brokers send none). */
      hosts?: IHost[];
      queue: IQueueItem[];
      runs?: IRun[];
      /** Sessions taken off their GPU whose variables wait in host memory for the owner's next cell. */
      in_host_memory?: IParked[];
      quotas?: IQuotas;
      /** Whether this Jupyter server has a pool token to send with cancels (never the token itself). */
      token_set?: boolean;
      /** What the pool makes of this server's user and token (protocol.Viewer; older brokers send none). */
      viewer?: IViewer;
    };

/** protocol.Viewer: ``admin`` may see and cancel every user's work (a JupyterHub admin, or the Hub's admin scope). */
export interface IViewer {
  user: string;
  admin: boolean;
  groups: string[];
  error: string | null;
}
