import * as React from 'react';

import { IGpuView, segmentTitle } from '../views/gpus';
import { leaseColour } from './colour';

/** A GPU's memory as one bar, a segment per lease, each as wide as its share of the GPU. */
export function MemoryBar(props: { gpu: IGpuView }): JSX.Element {
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
            ...leaseColour(s.user, s.mine)
          }}
          title={segmentTitle(s)}
        />
      ))}
    </div>
  );
}
