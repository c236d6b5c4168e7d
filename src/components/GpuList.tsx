import * as React from 'react';

import { IGpuView } from '../views/gpus';
import { GpuCard } from './GpuCard';

/** The GPUs section: a card per GPU, in the broker's order (by worker, then index). */
export function GpuList(props: { gpus: IGpuView[] }): JSX.Element {
  const { gpus } = props;
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-gpus">
      <h3>GPUs ({gpus.length})</h3>
      {gpus.length ? (
        gpus.map(g => <GpuCard key={g.id} gpu={g} />)
      ) : (
        <div className="jp-GpuPanel-empty">No GPU workers yet.</div>
      )}
    </section>
  );
}
