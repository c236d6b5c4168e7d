/** One GPU card's view: memory split by lease, badges, sparkline series. */
import { gpuView } from '../views/gpus';
import { GiB, snapshot } from './fixtures';

describe('gpuView', () => {
  it('splits memory by lease, mine first, with shares of the GPU', () => {
    const vm = gpuView((snapshot() as any).gpus[0], 'alice');
    expect(vm.badge).toBe('virtual');
    expect(vm.title).toBe('Virtual GPU 0');
    expect(vm.host).toBe('127.0.0.1');
    expect(vm.segments.map(s => [s.leaseId, s.user, s.mine, s.share])).toEqual([
      ['L1', 'alice', true, 0.25],
      ['L2', 'bob', false, 0.5]
    ]);
    expect(vm.segments[0].isolation).toBe('allocator-cap');
    expect(vm.freeBytes).toBe(4 * GiB);
    expect(vm.utilSeries).toEqual([0, 50, 37.5]);
    expect(vm.memSeries).toEqual([0, 0.5, 0.125]);
  });
  it('badges MIG slices and leaves real GPUs plain', () => {
    expect(gpuView({ id: 'g', index: 0, total_bytes: GiB, mig: true }, 'x').badge).toBe('MIG');
    expect(gpuView({ id: 'g', index: 0, total_bytes: GiB }, 'x').badge).toBeNull();
  });
  it('counts a lease without bytes_on_gpu by its bytes, and never overflows the bar', () => {
    const vm = gpuView({ id: 'g', index: 0, total_bytes: GiB, leases: [{ id: 'L', user: 'u', bytes: 2 * GiB }] }, 'x');
    expect(vm.segments[0].share).toBe(1);
    expect(vm.leasedBytes).toBe(2 * GiB);
    expect(vm.freeBytes).toBe(0);
  });
});
