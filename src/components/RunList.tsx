import * as React from 'react';

import { IRunView } from '../views/runs';
import { RunCard } from './RunCard';

/** The Scale-out runs section (the broker's latest runs, newest first); nothing when there are none. */
export function RunList(props: { runs: IRunView[] }): JSX.Element | null {
  const { runs } = props;
  if (!runs.length) {
    return null;
  }
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-runs">
      <h3>Scale-out runs ({runs.length})</h3>
      {runs.map(r => (
        <RunCard key={r.id} run={r} />
      ))}
    </section>
  );
}
