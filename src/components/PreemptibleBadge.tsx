import * as React from 'react';

import { PREEMPTIBLE_HELP } from './help';

/** The ``preemptible`` mark of a borrowed lease, with why in its tooltip. */
export function PreemptibleBadge(): JSX.Element {
  return (
    <span className="jp-GpuPanel-preemptible" title={PREEMPTIBLE_HELP}>
      preemptible
    </span>
  );
}
