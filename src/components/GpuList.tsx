import * as React from 'react';

import { IGpuView } from '../views/gpus';
import { UsageHistory } from '../views/history';
import { GpuCard } from './GpuCard';
import { chartSpan } from './TimeChart';

/** The GPUs section: a card per GPU, in the broker's order (by worker, then index), charts on one time axis. */
export function GpuList(props: { gpus: IGpuView[]; history: UsageHistory }): JSX.Element {
  const { gpus, history } = props;
  const span = chartSpan(
    gpus.map(g => history.gpu(g.id).util),
    history.now,
    history.window
  );
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-gpus">
      <h3>GPUs ({gpus.length})</h3>
      {gpus.length ? (
        gpus.map(g => <GpuCard key={g.id} gpu={g} history={history.gpu(g.id)} span={span} />)
      ) : (
        <div className="jp-GpuPanel-empty">No GPU workers yet.</div>
      )}
    </section>
  );
}
