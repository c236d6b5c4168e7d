import * as React from 'react';

import { sparklinePoints } from '../format';

const WIDTH = 120;
const HEIGHT = 24;

export interface ISparklineProps {
  values: number[];
  /** The top of the scale (100 for percent, 1 for shares); omitted: the largest value. */
  max?: number;
  /** What it plots, for screen readers and the tooltip. */
  label: string;
  className: string;
}

/** A small line chart (utilisation, memory in use, a run's loss), stretched to its box by CSS. */
export function Sparkline(props: ISparklineProps): JSX.Element {
  const points = sparklinePoints(props.values, WIDTH, HEIGHT, props.max);
  return (
    <svg
      className={`jp-GpuPanel-sparkline ${props.className}`}
      viewBox={`0 0 ${WIDTH} ${HEIGHT}`}
      preserveAspectRatio="none"
      role="img"
      aria-label={props.label}
    >
      <title>{props.label}</title>
      {points ? <polyline points={points} /> : null}
    </svg>
  );
}
