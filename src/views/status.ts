/** The status bar item's text, from the same view model as the panel so that the two never disagree. */
import { formatShare } from '../format';
import { IViewModel } from './viewmodel';

/** The status bar's short text: my share of the pool and whether I wait. */
export function statusText(vm: IViewModel): string {
  switch (vm.state) {
    case 'loading':
      return 'GPU: …';
    case 'no-pool':
      return 'GPU: no pool';
    case 'unreachable':
      return 'GPU: pool unreachable';
  }
  const parts = [`GPU: ${formatShare(vm.myShare)} of ${vm.poolTotal}`];
  if (vm.myQueued) {
    const first = vm.queue.find(q => q.mine);
    parts.push(`${vm.myQueued} queued${first ? ` (#${first.position})` : ''}`);
  }
  return parts.join(' · ');
}
