import * as React from 'react';

import { IRunView } from '../views/runs';
import { Sparkline } from './Sparkline';

/** A run's loss curve with its first and last value; nothing until there are two points to draw. */
function LossCurve(props: { values: number[] }): JSX.Element | null {
  if (props.values.length < 2) {
    return null;
  }
  const first = props.values[0];
  const last = props.values[props.values.length - 1];
  return (
    <div className="jp-GpuPanel-metric">
      <span className="jp-GpuPanel-metricLabel">
        loss {last.toPrecision(3)}
        <span className="jp-GpuPanel-metricFrom"> (from {first.toPrecision(3)})</span>
      </span>
      <Sparkline values={props.values} label="loss" className="jp-mod-loss" />
    </div>
  );
}

/** One scale-out run: its title and state, where and when it ran, a progress bar per rank and its loss curve. */
export function RunCard(props: { run: IRunView }): JSX.Element {
  const { run } = props;
  return (
    <div className="jp-GpuPanel-card jp-GpuPanel-run" data-run-id={run.id}>
      <div className="jp-GpuPanel-cardHeader">
        <span className="jp-GpuPanel-runTitle" title={run.id}>
          {run.title}
        </span>
        <span className="jp-GpuPanel-state">{run.state}</span>
      </div>
      <div className="jp-GpuPanel-sub jp-GpuPanel-runWhen">
        {run.mine ? '' : `${run.user} · `}
        {run.subtitle}
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
