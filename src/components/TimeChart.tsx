import * as React from 'react';

import { formatClock } from '../format';
import type { Point } from '../views/history';

/** The plot's drawing box; the SVG stretches it to the panel's width (strokes keep their width). */
const W = 300;
const H = 80;

export interface ISeries {
  label: string;
  points: Point[];
  /** The last value as the legend shows it (``42%``, ``0.5 GPU``). */
  value: string;
  /** A class for the line's colour (CSS), or an inline colour (other users' hues). */
  className?: string;
  colour?: string;
}

export interface ITimeChartProps {
  title: string;
  series: ISeries[];
  /** The top of the y axis, and the labelled lines (value, label), e.g. 0 / 50% / 100%. */
  yMax: number;
  yTicks: [number, string][];
  /** The time axis (epoch seconds). */
  start: number;
  end: number;
  /** Draw each value until the next one (what was held), instead of joining the points. */
  step?: boolean;
  className: string;
}

/** SVG ``points`` of a series in the plot box; values are clipped to [0, yMax]. */
export function chartPoints(points: Point[], start: number, end: number, yMax: number, step = false): string {
  const span = end - start || 1;
  const xy = points
    .filter(([t]) => t >= start && t <= end)
    .map(([t, v]) => [((t - start) / span) * W, H - (Math.min(Math.max(v, 0), yMax) / (yMax || 1)) * H]);
  const out: number[][] = [];
  xy.forEach((p, i) => {
    if (step && i > 0) {
      out.push([p[0], xy[i - 1][1]]);
    }
    out.push(p);
  });
  if (step && out.length) {
    out.push([W, out[out.length - 1][1]]); // held until now
  }
  return out.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(' ');
}

/** The time span a chart shows: its data's, at least a minute and at most ``window`` seconds. */
export function chartSpan(series: Point[][], end: number, window: number): [number, number] {
  const first = Math.min(...series.filter(s => s.length).map(s => s[0][0]), end);
  const span = Math.min(window, Math.max(60, end - first));
  return [end - span, end];
}

/**
 * A line chart over time with its axes: the y values on the left (gridlines across), clock times below,
 * and a legend with each series' last value. Plain SVG in a grid, so the text keeps the theme's font.
 */
export function TimeChart(props: ITimeChartProps): JSX.Element {
  const { start, end } = props;
  const times = [start, (start + end) / 2, end];
  return (
    <figure className={`jp-GpuPanel-chart ${props.className}`} aria-label={props.title}>
      <figcaption className="jp-GpuPanel-chartTitle">{props.title}</figcaption>
      <div className="jp-GpuPanel-chartBody">
        <div className="jp-GpuPanel-chartY" aria-hidden="true">
          {props.yTicks.map(([value, label]) => (
            <span key={label} style={{ top: `${100 - (100 * value) / (props.yMax || 1)}%` }}>
              {label}
            </span>
          ))}
        </div>
        <svg className="jp-GpuPanel-chartPlot" viewBox={`0 0 ${W} ${H}`} preserveAspectRatio="none" role="img">
          <title>
            {props.title}: {props.series.map(s => `${s.label} ${s.value}`).join(', ')}
          </title>
          {props.yTicks.map(([value, label]) => {
            const y = H - (value / (props.yMax || 1)) * H;
            return <line key={label} className="jp-GpuPanel-chartGrid" x1={0} x2={W} y1={y} y2={y} />;
          })}
          {[W / 2].map(x => (
            <line key={x} className="jp-GpuPanel-chartGrid" x1={x} x2={x} y1={0} y2={H} />
          ))}
          {props.series.map(s => (
            <polyline
              key={s.label}
              className={`jp-GpuPanel-chartLine ${s.className ?? ''}`}
              style={s.colour ? { stroke: s.colour } : undefined}
              points={chartPoints(s.points, start, end, props.yMax, props.step)}
            />
          ))}
        </svg>
      </div>
      <div className="jp-GpuPanel-chartX">
        {times.map((t, i) => (
          <span key={i}>{formatClock(t)}</span>
        ))}
      </div>
      <ul className="jp-GpuPanel-legend">
        {props.series.map(s => (
          <li key={s.label}>
            <span
              className={`jp-GpuPanel-legendSwatch ${s.className ?? ''}`}
              style={s.colour ? { backgroundColor: s.colour } : undefined}
            />
            <span className="jp-GpuPanel-legendLabel">{s.label}</span>
            <span className="jp-GpuPanel-legendValue">{s.value}</span>
          </li>
        ))}
      </ul>
    </figure>
  );
}
