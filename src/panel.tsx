/**
 * The GPU side panel: a ReactWidget that re-renders on every snapshot from the SnapshotFeed.
 *
 * It only draws the view model (model.ts) and forwards button presses to the actions the plugin gives it,
 * so all decisions about what to show live in the tested pure module.
 */
import { Dialog, ReactWidget, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { cancelWork, scalePool, startPool } from './api';
import { SnapshotFeed } from './client';
import { gpuIcon } from './icon';
import {
  IGpuView,
  IQuotaView,
  IRunView,
  ISegmentView,
  ISnapshot,
  ITeamQuotaView,
  IViewModel,
  buildViewModel,
  formatBytes,
  formatShare,
  myQuotaText,
  notebookLabel,
  scaleRequest,
  sparklinePoints
} from './model';

export interface IPanelActions {
  /** Open the notebook (and select the cell) that holds a lease; absent without a document manager. */
  goToCell?: (notebook: string, cell: string | null) => Promise<void>;
}

export interface IPanelOptions {
  feed: SnapshotFeed;
  actions?: IPanelActions;
  defaultFraction?: number;
}

/** A stable, theme-neutral colour per user; my leases use the brand colour instead (see CSS). */
export function userHue(user: string): number {
  let h = 0;
  for (let i = 0; i < user.length; i++) {
    h = (h * 31 + user.charCodeAt(i)) >>> 0;
  }
  return h % 360;
}

function Sparkline(props: { values: number[]; max?: number; label: string; className: string }): JSX.Element {
  const width = 120;
  const height = 24;
  const points = sparklinePoints(props.values, width, height, props.max);
  return (
    <svg
      className={`jp-GpuPanel-sparkline ${props.className}`}
      viewBox={`0 0 ${width} ${height}`}
      preserveAspectRatio="none"
      role="img"
      aria-label={props.label}
    >
      <title>{props.label}</title>
      {points ? <polyline points={points} /> : null}
    </svg>
  );
}

function segmentTitle(s: ISegmentView): string {
  const where = [s.notebook, s.cell].filter(Boolean).join(' › ');
  const fraction = s.fraction !== null ? `${formatShare(s.fraction)} GPU` : formatBytes(s.bytes);
  return `${s.user}${where ? ` – ${where}` : ''}: ${fraction} (${formatBytes(s.bytes)}), isolation ${s.isolation}, ${s.state}${
    s.preemptible ? ', preemptible' : ''
  }`;
}

/** Why a lease is marked preemptible, for its tooltip (docs/fair-share.md, "Borrowing and reclaim"). */
const PREEMPTIBLE_HELP =
  "borrowed: granted beyond its team's guarantee on idle capacity, so the pool may end it (after its " +
  'minimum run time) when another team needs its guarantee back';

/** Why the panel suggests a smaller ``--memory``, for the hint's tooltip. */
const RIGHT_SIZE_HELP =
  "this session's peak memory is under a quarter of what it reserves: a smaller request starts sooner and " +
  'leaves the rest of the GPU to others';

function PreemptibleBadge(): JSX.Element {
  return (
    <span className="jp-GpuPanel-preemptible" title={PREEMPTIBLE_HELP}>
      preemptible
    </span>
  );
}

function MemoryBar(props: { gpu: IGpuView }): JSX.Element {
  return (
    <div className="jp-GpuPanel-memBar" role="img" aria-label="memory by lease">
      {props.gpu.segments.map(s => (
        <div
          key={s.leaseId}
          className={['jp-GpuPanel-memSegment', s.mine ? 'jp-mod-mine' : '', s.preemptible ? 'jp-mod-preemptible' : '']
            .filter(Boolean)
            .join(' ')}
          style={{
            width: `${(s.share * 100).toFixed(2)}%`,
            ...(s.mine ? {} : { backgroundColor: `hsl(${userHue(s.user)}, 55%, 55%)` })
          }}
          title={segmentTitle(s)}
        />
      ))}
    </div>
  );
}

function GpuCard(props: { gpu: IGpuView }): JSX.Element {
  const { gpu } = props;
  const util = gpu.utilization !== null ? `${Math.round(gpu.utilization)}%` : '–';
  return (
    <div className="jp-GpuPanel-card" data-gpu-id={gpu.id}>
      <div className="jp-GpuPanel-cardHeader">
        <span className="jp-GpuPanel-gpuName" title={gpu.id}>
          {gpu.title}
        </span>
        {gpu.host ? <span className="jp-GpuPanel-host">{gpu.host}</span> : null}
        {gpu.badge ? (
          <span className={`jp-GpuPanel-badge jp-GpuPanel-badge-${gpu.badge.toLowerCase()}`}>{gpu.badge}</span>
        ) : null}
      </div>
      <MemoryBar gpu={gpu} />
      <div className="jp-GpuPanel-memText">
        {formatBytes(gpu.leasedBytes)} of {formatBytes(gpu.totalBytes)} leased · {formatBytes(gpu.freeBytes)} free
      </div>
      <div className="jp-GpuPanel-metrics">
        <div className="jp-GpuPanel-metric">
          <span className="jp-GpuPanel-metricLabel">util {util}</span>
          <Sparkline values={gpu.utilSeries} max={100} label="utilization" className="jp-mod-util" />
        </div>
        <div className="jp-GpuPanel-metric">
          <span className="jp-GpuPanel-metricLabel">mem {gpu.usedBytes !== null ? formatBytes(gpu.usedBytes) : '–'}</span>
          <Sparkline values={gpu.memSeries} max={1} label="memory in use" className="jp-mod-mem" />
        </div>
      </div>
      {gpu.segments.length ? (
        <ul className="jp-GpuPanel-leases">
          {gpu.segments.map(s => (
            <li
              key={s.leaseId}
              className={`${s.mine ? 'jp-mod-mine' : ''}${s.preemptible ? ' jp-mod-preemptible' : ''}`}
              data-lease-id={s.leaseId}
              title={segmentTitle(s)}
            >
              <span
                className="jp-GpuPanel-swatch"
                style={s.mine ? {} : { backgroundColor: `hsl(${userHue(s.user)}, 55%, 55%)` }}
              />
              <span className="jp-GpuPanel-user">{s.user}</span>
              <span className="jp-GpuPanel-where" title={s.notebook ?? undefined}>
                {notebookLabel(s.notebook) ?? ''}
                {s.cell ? ` › ${s.cell}` : ''}
              </span>
              <span className="jp-GpuPanel-fraction">
                {s.fraction !== null ? formatShare(s.fraction) : formatBytes(s.bytes)}
              </span>
              {s.preemptible ? <PreemptibleBadge /> : null}
              <span className="jp-GpuPanel-isolation">{s.isolation}</span>
            </li>
          ))}
        </ul>
      ) : (
        <div className="jp-GpuPanel-empty">idle</div>
      )}
    </div>
  );
}

function QuotaBar(props: { row: ITeamQuotaView }): JSX.Element {
  const { row } = props;
  const pct = (share: number) => `${(share * 100).toFixed(2)}%`;
  return (
    <div className="jp-GpuPanel-quotaBar" role="img" aria-label={`${row.team}: ${row.text}`} title={row.text}>
      <div className="jp-GpuPanel-quotaHeld" style={{ width: pct(row.withinShare) }} />
      {row.overShare > 0 ? (
        <div className="jp-GpuPanel-quotaOver" style={{ width: pct(row.overShare) }} title={PREEMPTIBLE_HELP} />
      ) : null}
      {/* the bar ends at the limit, else at the guarantee: a tick marks the guarantee only inside the bar */}
      {row.guarantee > 0 && row.guaranteeAt < 1 ? (
        <div className="jp-GpuPanel-quotaTick" style={{ left: pct(row.guaranteeAt) }} title="guarantee" />
      ) : null}
    </div>
  );
}

/** Teams' guarantees, what each holds and whether it borrows; my team first and highlighted. */
function QuotaSection(props: { quotas: IQuotaView; me: string }): JSX.Element {
  const { quotas } = props;
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-quotas">
      <h3>Quotas</h3>
      <ul className="jp-GpuPanel-list">
        {quotas.teams.map(t => (
          <li
            key={t.team}
            className={`jp-GpuPanel-quotaRow${t.mine ? ' jp-mod-mine' : ''}`}
            data-team={t.team}
            title={t.members.length ? `members: ${t.members.join(', ')}` : undefined}
          >
            <div className="jp-GpuPanel-itemMain">
              <span className="jp-GpuPanel-team">{t.team}</span>
              <span className="jp-GpuPanel-quotaText">{t.text}</span>
            </div>
            <QuotaBar row={t} />
            {t.over ? (
              <div className="jp-GpuPanel-quotaHint" title={PREEMPTIBLE_HELP}>
                over guarantee: preemptible
              </div>
            ) : null}
          </li>
        ))}
      </ul>
      <div className="jp-GpuPanel-sub jp-GpuPanel-myQuota">
        {props.me}
        {quotas.myTeam ? ` (team ${quotas.myTeam})` : ''}: {myQuotaText(quotas)}
      </div>
    </section>
  );
}

function LossCurve(props: { values: number[] }): JSX.Element | null {
  if (props.values.length < 2) {
    return null;
  }
  const last = props.values[props.values.length - 1];
  return (
    <div className="jp-GpuPanel-metric">
      <span className="jp-GpuPanel-metricLabel">loss {last.toPrecision(3)}</span>
      <Sparkline values={props.values} label="loss" className="jp-mod-loss" />
    </div>
  );
}

function RunCard(props: { run: IRunView }): JSX.Element {
  const { run } = props;
  return (
    <div className="jp-GpuPanel-card jp-GpuPanel-run" data-run-id={run.id}>
      <div className="jp-GpuPanel-cardHeader">
        <span className="jp-GpuPanel-gpuName">{run.title}</span>
        <span className="jp-GpuPanel-state">{run.state}</span>
      </div>
      {run.ranks.map(r => (
        <div className="jp-GpuPanel-rank" key={r.rank}>
          <span className="jp-GpuPanel-rankLabel">rank {r.rank}</span>
          <progress max={1} value={r.progress ?? undefined} />
          <span className="jp-GpuPanel-rankText">{r.label || r.state}</span>
        </div>
      ))}
      <LossCurve values={run.loss} />
    </div>
  );
}

/** The Scale dialog's body (manual worker count or adaptive bounds, as in dask-labextension). */
class ScaleForm extends ReactWidget {
  constructor(current: number) {
    super();
    this._n = String(current);
    this._min = String(Math.min(1, current));
    this._max = String(Math.max(1, current));
    this.addClass('jp-GpuPanel-scaleForm');
  }

  getValue(): ReturnType<typeof scaleRequest> {
    return scaleRequest(this._mode, { n: this._n, minimum: this._min, maximum: this._max });
  }

  protected render(): JSX.Element {
    const set = (f: () => void) => () => {
      f();
      this.update();
    };
    return (
      <div>
        <label>
          <input
            type="radio"
            name="jp-gpu-scale-mode"
            checked={this._mode === 'manual'}
            onChange={set(() => (this._mode = 'manual'))}
          />
          Manual scaling
        </label>
        <div className="jp-GpuPanel-scaleRow">
          Workers
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="n"
            disabled={this._mode !== 'manual'}
            defaultValue={this._n}
            onChange={e => (this._n = e.target.value)}
          />
        </div>
        <label>
          <input
            type="radio"
            name="jp-gpu-scale-mode"
            checked={this._mode === 'adaptive'}
            onChange={set(() => (this._mode = 'adaptive'))}
          />
          Adaptive scaling
        </label>
        <div className="jp-GpuPanel-scaleRow">
          Minimum
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="minimum"
            disabled={this._mode !== 'adaptive'}
            defaultValue={this._min}
            onChange={e => (this._min = e.target.value)}
          />
          Maximum
          <input
            className="jp-mod-styled"
            type="number"
            min={0}
            name="maximum"
            disabled={this._mode !== 'adaptive'}
            defaultValue={this._max}
            onChange={e => (this._max = e.target.value)}
          />
        </div>
      </div>
    );
  }

  private _mode: 'manual' | 'adaptive' = 'manual';
  private _n: string;
  private _min: string;
  private _max: string;
}

export async function openScaleDialog(current: number): Promise<boolean> {
  const result = await showDialog({
    title: 'Scale the GPU pool',
    body: new ScaleForm(current),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Scale' })]
  });
  if (!result.button.accept || !result.value) {
    return false;
  }
  const value = result.value;
  if ('error' in value) {
    await showErrorMessage('Scale the GPU pool', value.error);
    return false;
  }
  try {
    await scalePool(value.body);
  } catch (error) {
    await showErrorMessage('Scale the GPU pool', String((error as Error).message ?? error));
    return false;
  }
  return true;
}

/**
 * Cancel through the server and turn the broker's refusal (someone else's work, a missing or wrong token)
 * into an error, so the panel shows its reason instead of silently keeping the item.
 */
async function cancelOrExplain(id: string): Promise<void> {
  const reply = await cancelWork(id);
  if (!reply.cancelled) {
    throw new Error(`Not cancelled: ${reply.what}`);
  }
}

interface IViewProps {
  vm: IViewModel;
  live: boolean;
  actions: IPanelActions;
  defaultFraction: number;
  refresh: () => void;
}

function PanelView(props: IViewProps): JSX.Element {
  const { vm, actions } = props;
  const [busy, setBusy] = React.useState<string | null>(null);
  const [message, setMessage] = React.useState<string | null>(null);

  const run = async (what: string, f: () => Promise<unknown>) => {
    setBusy(what);
    setMessage(null);
    try {
      await f();
    } catch (error) {
      setMessage(String((error as Error).message ?? error));
    } finally {
      setBusy(null);
      props.refresh();
    }
  };

  const header = (
    <div className="jp-GpuPanel-header">
      <div className="jp-GpuPanel-headerRow">
        <gpuIcon.react tag="span" className="jp-GpuPanel-headerIcon" />
        <span className="jp-GpuPanel-title">GPU pool</span>
        <span
          className={`jp-GpuPanel-live${props.live ? ' jp-mod-live' : ''}`}
          title={props.live ? 'live (websocket)' : 'polling'}
        />
        {vm.state === 'ok' && vm.scalable ? (
          <button
            className="jp-GpuPanel-scale jp-mod-styled jp-mod-accept"
            disabled={busy !== null}
            onClick={() => void run('scale', () => openScaleDialog(vm.workers))}
          >
            Scale
          </button>
        ) : null}
      </div>
      {vm.state === 'ok' ? (
        <div className="jp-GpuPanel-summary" title={vm.address ?? ''}>
          {vm.workers} worker{vm.workers === 1 ? '' : 's'} · {formatShare(vm.poolLeased)} of {vm.poolTotal} GPU
          {vm.poolTotal === 1 ? '' : 's'} leased{vm.embedded ? ' · embedded' : ''}
        </div>
      ) : null}
    </div>
  );

  let body: JSX.Element;
  if (vm.state === 'loading') {
    body = <div className="jp-GpuPanel-state jp-GpuPanel-loading">Connecting to the pool…</div>;
  } else if (vm.state === 'no-pool') {
    body = (
      <div className="jp-GpuPanel-state jp-GpuPanel-noPool">
        <p>No GPU pool is running for this server.</p>
        <p>
          Start the embedded pool on this machine, or set <code>JUPYTER_GPU_SCHEDULER</code> to a shared pool's
          address before starting JupyterLab. A <code>%%gpu</code> cell asks for {formatShare(props.defaultFraction)}{' '}
          GPU by default.
        </p>
        <button
          className="jp-GpuPanel-start jp-mod-styled jp-mod-accept"
          disabled={busy !== null}
          onClick={() =>
            void run('start', async () => {
              const reply = await startPool();
              if (!reply.started) {
                throw new Error(reply.error ?? 'the pool did not start');
              }
            })
          }
        >
          {busy === 'start' ? 'Starting…' : 'Start pool'}
        </button>
      </div>
    );
  } else if (vm.state === 'unreachable') {
    body = (
      <div className="jp-GpuPanel-state jp-GpuPanel-unreachable">
        <p>
          The GPU pool{vm.address ? <code> {vm.address}</code> : null} does not answer.
        </p>
        <pre className="jp-GpuPanel-error">{vm.error}</pre>
        <p>It may be starting or have stopped; the panel keeps retrying.</p>
      </div>
    );
  } else {
    body = (
      <>
        {vm.virtual ? (
          <div className="jp-GpuPanel-notice jp-GpuPanel-virtualNotice">
            This pool uses <b>virtual GPUs</b>: memory is accounted and leases are real, but cells run on the CPU
            and utilization is the share of memory leased to running cells.
          </div>
        ) : null}
        {vm.tokenMissing ? (
          <div className="jp-GpuPanel-notice jp-GpuPanel-tokenNotice">
            This pool checks user tokens and this Jupyter server has none, so the pool refuses its Cancel. Set{' '}
            <code>JUPYTER_GPU_TOKEN</code> (or <code>c.GpuPanelConfig.token</code>) before starting JupyterLab.
          </div>
        ) : null}
        <section className="jp-GpuPanel-section jp-GpuPanel-gpus">
          <h3>GPUs ({vm.gpus.length})</h3>
          {vm.gpus.length ? (
            vm.gpus.map(g => <GpuCard key={g.id} gpu={g} />)
          ) : (
            <div className="jp-GpuPanel-empty">No GPU workers yet.</div>
          )}
        </section>
        <section className="jp-GpuPanel-section jp-GpuPanel-mine">
          <h3>My sessions ({vm.sessions.length})</h3>
          {vm.sessions.length ? (
            <ul className="jp-GpuPanel-list">
              {vm.sessions.map(s => (
                <li key={s.id} className="jp-GpuPanel-item jp-mod-mine" data-lease-id={s.id}>
                  <div className="jp-GpuPanel-itemMain">
                    <span className="jp-GpuPanel-where">
                      {s.notebook && actions.goToCell ? (
                        <a
                          href="#"
                          className="jp-GpuPanel-goto"
                          title="go to cell"
                          onClick={e => {
                            e.preventDefault();
                            void actions.goToCell!(s.notebook!, s.cell);
                          }}
                        >
                          {s.notebook}
                          {s.cell ? ` › ${s.cell}` : ''}
                        </a>
                      ) : (
                        (notebookLabel(s.notebook) ?? s.id) + (s.cell ? ` › ${s.cell}` : '')
                      )}
                    </span>
                    <button
                      className="jp-GpuPanel-cancel jp-mod-styled jp-mod-reject"
                      disabled={busy !== null}
                      title={`end session ${s.id}`}
                      onClick={() => void run(`cancel ${s.id}`, () => cancelOrExplain(s.id))}
                    >
                      Cancel
                    </button>
                  </div>
                  <div className="jp-GpuPanel-sub">
                    {s.state} · GPU {s.gpus.join(', ')} · {s.elapsed} · isolation {s.isolation}
                    {s.preemptible ? <> · <PreemptibleBadge /></> : null}
                  </div>
                  <div className="jp-GpuPanel-sub jp-GpuPanel-usage">{s.usage}</div>
                  {s.rightSize ? (
                    <div className="jp-GpuPanel-rightSize" title={RIGHT_SIZE_HELP}>
                      {s.rightSize}
                    </div>
                  ) : null}
                </li>
              ))}
            </ul>
          ) : (
            <div className="jp-GpuPanel-empty">
              None. Start one with <code>%%gpu</code> in a notebook cell.
            </div>
          )}
          {vm.inHostMemory.length ? (
            <>
              <h4 className="jp-GpuPanel-parkedTitle">In host memory ({vm.inHostMemory.length})</h4>
              <ul className="jp-GpuPanel-list jp-GpuPanel-parked">
                {vm.inHostMemory.map(p => (
                  <li key={p.id} className="jp-GpuPanel-item jp-mod-mine jp-mod-parked" data-lease-id={p.id}>
                    <div className="jp-GpuPanel-itemMain">
                      <span className="jp-GpuPanel-where">
                        {(notebookLabel(p.notebook) ?? p.id) + (p.cell ? ` › ${p.cell}` : '')}
                      </span>
                    </div>
                    <div className="jp-GpuPanel-sub">
                      {p.what} · off the GPU for {p.since} · back with your next <code>%%gpu</code> cell there
                    </div>
                    {p.reason ? <div className="jp-GpuPanel-sub jp-GpuPanel-parkedReason">{p.reason}</div> : null}
                    {p.lost.length ? (
                      <div className="jp-GpuPanel-sub jp-GpuPanel-parkedLost">
                        not kept (cannot be pickled): {p.lost.join(', ')}
                      </div>
                    ) : null}
                  </li>
                ))}
              </ul>
            </>
          ) : null}
        </section>
        {vm.quotas?.configured ? <QuotaSection quotas={vm.quotas} me={vm.me} /> : null}
        <section className="jp-GpuPanel-section jp-GpuPanel-queue">
          <h3>Queue ({vm.queue.length})</h3>
          {vm.quotas && !vm.quotas.configured ? (
            <div className="jp-GpuPanel-sub jp-GpuPanel-noQuotas">
              No quotas: the queue is ordered by fair share of recent use.
            </div>
          ) : null}
          {vm.queue.length ? (
            <ol className="jp-GpuPanel-list">
              {vm.queue.map(q => (
                <li key={q.id} className={`jp-GpuPanel-item${q.mine ? ' jp-mod-mine' : ''}`} data-request-id={q.id}>
                  <div className="jp-GpuPanel-itemMain">
                    <span className="jp-GpuPanel-position">#{q.position}</span>
                    <span className="jp-GpuPanel-user">{q.user}</span>
                    <span className="jp-GpuPanel-request">{q.request}</span>
                    {q.mine ? (
                      <button
                        className="jp-GpuPanel-cancel jp-mod-styled jp-mod-reject"
                        disabled={busy !== null}
                        title={`cancel request ${q.id}`}
                        onClick={() => void run(`cancel ${q.id}`, () => cancelOrExplain(q.id))}
                      >
                        Cancel
                      </button>
                    ) : null}
                  </div>
                  <div className="jp-GpuPanel-reason">{q.reason}</div>
                  <div className="jp-GpuPanel-sub">
                    waiting {q.waited} · eta {q.eta}
                    {q.notebook ? ` · ${notebookLabel(q.notebook)}` : ''}
                  </div>
                </li>
              ))}
            </ol>
          ) : (
            <div className="jp-GpuPanel-empty">Nobody is waiting.</div>
          )}
        </section>
        {vm.runs.length ? (
          <section className="jp-GpuPanel-section jp-GpuPanel-runs">
            <h3>Scale-out runs ({vm.runs.length})</h3>
            {vm.runs.map(r => (
              <RunCard key={r.id} run={r} />
            ))}
          </section>
        ) : null}
      </>
    );
  }

  return (
    <div className="jp-GpuPanel-content" data-state={vm.state}>
      {header}
      {message ? (
        <div className="jp-GpuPanel-notice jp-GpuPanel-message" role="alert">
          {message}
        </div>
      ) : null}
      {body}
    </div>
  );
}

export class GpuPanel extends ReactWidget {
  constructor(options: IPanelOptions) {
    super();
    this._feed = options.feed;
    this._actions = options.actions ?? {};
    this._defaultFraction = options.defaultFraction ?? 0.25;
    this.id = 'jupyter-gpu-panel';
    this.title.icon = gpuIcon;
    this.title.caption = 'GPU pool';
    this.addClass('jp-GpuPanel');
  }

  set defaultFraction(value: number) {
    this._defaultFraction = value;
    this.update();
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this._feed.changed} initialArgs={this._feed.latest ?? undefined}>
        {(_, snapshot?: ISnapshot) => (
          <PanelView
            vm={buildViewModel(snapshot ?? null, Date.now() / 1000)}
            live={this._feed.live}
            actions={this._actions}
            defaultFraction={this._defaultFraction}
            refresh={() => void this._feed.refresh()}
          />
        )}
      </UseSignal>
    );
  }

  private _feed: SnapshotFeed;
  private _actions: IPanelActions;
  private _defaultFraction: number;
}
