/**
 * The GPU side panel: a ReactWidget that re-renders on every snapshot from the SnapshotFeed.
 *
 * It only lays out the view model (src/views/) with the section components (src/components/) and runs the
 * actions (start, scale, cancel) one at a time, showing why one failed; every decision about what to show
 * lives in the tested view builders, and every rule the broker owns arrives in the snapshot. The one state
 * it keeps is the usage history behind the charts (views/history.ts), fed by every snapshot.
 */
import { Dialog, ReactWidget, showDialog } from '@jupyterlab/apputils';
import { UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { cancelWork, startPool } from './api';
import { SnapshotFeed } from './client';
import { GpuList } from './components/GpuList';
import { JobList } from './components/JobList';
import { MySessions } from './components/MySessions';
import { PanelHeader } from './components/PanelHeader';
import { Connecting, NoPool, Unreachable } from './components/PoolStates';
import { QueueList } from './components/QueueList';
import { QuotaSection } from './components/QuotaSection';
import { RunList } from './components/RunList';
import { openScaleDialog } from './components/ScaleDialog';
import { UsageSection } from './components/UsageSection';
import { notebookLabel } from './format';
import { gpuIcon } from './icon';
import { UsageHistory } from './views/history';
import { ISessionView } from './views/sessions';
import { IViewModel, buildViewModel } from './views/viewmodel';
import { ISnapshot } from './wire';

export interface IPanelActions {
  /** Open the notebook (and select the cell) that holds a lease; absent without a document manager. */
  goToCell?: (notebook: string, cell: string | null) => Promise<void>;
}

export interface IPanelOptions {
  feed: SnapshotFeed;
  actions?: IPanelActions;
  defaultFraction?: number;
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

/**
 * Ask before ending a session that holds variables: what the notebook's %%gpu cells built lives only there,
 * and the Cancel button sits beside the session it ends. True to go on.
 */
export async function confirmEndSession(session: ISessionView): Promise<boolean> {
  const where = session.notebook ? ` of ${notebookLabel(session.notebook)}` : '';
  const result = await showDialog({
    title: `End GPU session ${session.id}?`,
    body:
      `Its variables are lost: what the %%gpu cells${where} built (models, tensors, data) lives only in this ` +
      'session. The next %%gpu cell starts a new, empty one. To keep a value, bring it back first with ' +
      '%gpu pull NAME.',
    buttons: [Dialog.cancelButton({ label: 'Keep it' }), Dialog.warnButton({ label: 'End session' })]
  });
  return result.button.accept;
}

/** Start the embedded pool, or fail with the server's reason. */
async function startOrExplain(): Promise<void> {
  const reply = await startPool();
  if (!reply.started) {
    throw new Error(reply.error ?? 'the pool did not start');
  }
}

interface IViewProps {
  vm: IViewModel;
  history: UsageHistory;
  live: boolean;
  actions: IPanelActions;
  defaultFraction: number;
  refresh: () => void;
}

/** The panel's body for a pool that answers: notices, then the GPUs, my sessions, quotas, queue, runs. */
function PoolSections(props: {
  vm: IViewModel;
  history: UsageHistory;
  actions: IPanelActions;
  busy: boolean;
  onCancel: (id: string) => void;
}): JSX.Element {
  const { vm } = props;
  return (
    <>
      {vm.virtual ? (
        <div className="jp-GpuPanel-notice jp-GpuPanel-virtualNotice">
          This pool uses <b>virtual GPUs</b>: memory is accounted and leases are real, but cells run on the CPU and
          utilization is the share of memory leased to running cells.
        </div>
      ) : null}
      {vm.notIsolated ? (
        <div className="jp-GpuPanel-notice jp-GpuPanel-isolationNotice">
          Users of this pool are <b>not isolated</b> from each other: sessions run as the worker&apos;s account, not as
          their users&apos;. The pool&apos;s admin isolates them by running <code>jupyter-gpu worker</code> as root
          (docs/security.md).
        </div>
      ) : null}
      {vm.tokenMissing ? (
        <div className="jp-GpuPanel-notice jp-GpuPanel-tokenNotice">
          This pool checks user tokens and this Jupyter server has none, so the pool refuses its Cancel. Set{' '}
          <code>JUPYTER_GPU_TOKEN</code> (or <code>c.GpuPanelConfig.token</code>) before starting JupyterLab.
        </div>
      ) : null}
      <GpuList gpus={vm.gpus} history={props.history} groups={vm.hostGroups} />
      <UsageSection history={props.history} me={vm.me} poolTotal={vm.poolTotal} />
      <JobList cluster={vm.cluster} />
      <MySessions
        sessions={vm.sessions}
        inHostMemory={vm.inHostMemory}
        admin={vm.admin}
        goToCell={props.actions.goToCell}
        busy={props.busy}
        onCancel={props.onCancel}
      />
      {vm.quotas?.configured ? <QuotaSection quotas={vm.quotas} me={vm.me} /> : null}
      <QueueList
        queue={vm.queue}
        noQuotas={!!vm.quotas && !vm.quotas.configured}
        busy={props.busy}
        onCancel={props.onCancel}
      />
      <RunList runs={vm.runs} />
    </>
  );
}

function PanelView(props: IViewProps): JSX.Element {
  const { vm } = props;
  const [busy, setBusy] = React.useState<string | null>(null);
  const [message, setMessage] = React.useState<string | null>(null);

  /** Run one action at a time (``what`` names it while it runs), then show its error, if any, and refresh. */
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
  const isBusy = busy !== null;
  /** Cancel a request, or end a session: asking first when the session holds variables. */
  const cancel = async (id: string) => {
    const session = vm.state === 'ok' ? vm.sessions.find(s => s.id === id) : undefined;
    if (session?.holdsVariables && !(await confirmEndSession(session))) {
      return;
    }
    await run(`cancel ${id}`, () => cancelOrExplain(id));
  };

  let body: JSX.Element;
  if (vm.state === 'loading') {
    body = <Connecting />;
  } else if (vm.state === 'no-pool') {
    body = (
      <NoPool
        defaultFraction={props.defaultFraction}
        starting={busy === 'start'}
        busy={isBusy}
        onStart={() => void run('start', startOrExplain)}
      />
    );
  } else if (vm.state === 'unreachable') {
    body = <Unreachable address={vm.address} error={vm.error} />;
  } else {
    body = (
      <PoolSections
        vm={vm}
        history={props.history}
        actions={props.actions}
        busy={isBusy}
        onCancel={id => void cancel(id)}
      />
    );
  }

  return (
    <div className="jp-GpuPanel-content" data-state={vm.state}>
      <PanelHeader
        vm={vm}
        live={props.live}
        busy={isBusy}
        onScale={() => void run('scale', () => openScaleDialog(vm.workers))}
      />
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
    // every snapshot feeds the usage charts, whether or not the panel is on screen
    this._history.add(this._feed.latest);
    this._feed.changed.connect((_, snapshot) => this._history.add(snapshot), this);
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
            history={this._history}
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
  private _history = new UsageHistory();
  private _actions: IPanelActions;
  private _defaultFraction: number;
}
