import * as React from 'react';

import { formatShare } from '../format';
import { UsageHistory } from '../views/history';
import { userHue } from './colour';
import { chartSpan, ISeries, TimeChart } from './TimeChart';

/** At most this many users get a line of their own (the ones who held most); the chart stays readable. */
const MAX_USERS = 6;

/**
 * Usage over time per user: the GPUs each held (in GPU-equivalents), since this panel opened (up to the
 * history's window). Mine in the brand colour, others in their lease colour; nothing before two snapshots.
 */
export function UsageSection(props: { history: UsageHistory; me: string; poolTotal: number }): JSX.Element | null {
  const users = props.history.users().slice(0, MAX_USERS);
  const points = users.flatMap(u => u.points);
  if (points.length < 2) {
    return null;
  }
  const top = Math.max(1, props.poolTotal, ...points.map(p => p[1]));
  const [start, end] = chartSpan(
    users.map(u => u.points),
    props.history.now,
    props.history.window
  );
  const series: ISeries[] = users.map(u => {
    const last = u.points[u.points.length - 1][1];
    const mine = u.user === props.me;
    return {
      label: mine ? `${u.user} (me)` : u.user,
      value: `${formatShare(last)} GPU`,
      points: u.points,
      className: mine ? 'jp-mod-mine' : undefined,
      colour: mine ? undefined : `hsl(${userHue(u.user)}, 55%, 50%)`
    };
  });
  return (
    <section className="jp-GpuPanel-section jp-GpuPanel-usageOverTime">
      <h3>Usage over time</h3>
      <TimeChart
        title="GPUs held per user"
        className="jp-mod-users"
        yMax={top}
        yTicks={[
          [0, '0'],
          [top, `${formatShare(top)} GPU`]
        ]}
        start={start}
        end={end}
        step
        series={series}
      />
    </section>
  );
}
