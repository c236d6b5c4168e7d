/// <reference path="./react-dom-server.d.ts" />
/** A pool across machines in the panel: GPUs grouped by host, the cluster manager's jobs with its own words. */
import * as React from 'react';
import { renderToStaticMarkup } from 'react-dom/server';

import { GpuList } from '../components/GpuList';
import { UsageHistory } from '../views/history';
import { gpuView, hostGroups, hostResources } from '../views/gpus';
import { clusterView, jobStatus } from '../views/jobs';
import { buildViewModel } from '../views/viewmodel';
import { ISnapshot } from '../wire';
import { GiB } from './fixtures';

function gpu(host: string, port: number, leased: number) {
  return {
    id: `tcp://${host}:${port}#0`,
    worker: `tcp://${host}:${port}`,
    host,
    index: 0,
    name: 'Virtual GPU 0',
    total_bytes: 4 * GiB,
    leased_bytes: leased,
    virtual: true,
    leases: []
  };
}

/** Three GPUs on two hosts, in the broker's order (by host), and a Slurm job waiting for resources. */
function multiHost(): ISnapshot {
  return {
    state: 'ok',
    me: 'alice',
    time: 1000,
    pool: {
      address: 'tcp://10.0.0.2:8786',
      scalable: true,
      workers: 3,
      cluster: {
        kind: 'slurm',
        manager: 'dask_jobqueue.SLURMCluster',
        gpus_per_job: 1,
        target: 4,
        adaptive: null,
        jobs: [
          { name: 'jupyter-gpu-3', job_id: '123', state: 'PENDING', reason: 'Resources', workers: 0, since: 940 },
          { name: 'jupyter-gpu-0', job_id: '120', state: 'RUNNING', reason: null, workers: 1, since: 900 }
        ],
        ended: [{ name: 'jupyter-gpu-1', job_id: '121', state: 'TIMEOUT', reason: 'TimeLimit', ended: 990 }]
      }
    },
    gpus: [gpu('10.0.0.9', 4000, GiB), gpu('10.0.0.9', 4001, 0), gpu('10.0.0.10', 4000, 2 * GiB)],
    hosts: [
      { host: '10.0.0.9', workers: 2, gpus: [], total_bytes: 8 * GiB, leased_bytes: GiB },
      { host: '10.0.0.10', workers: 1, gpus: [], total_bytes: 4 * GiB, leased_bytes: 2 * GiB }
    ],
    queue: []
  };
}

describe('hostGroups', () => {
  it('groups GPUs by host in the broker order, with each host total and leased memory', () => {
    const snap = multiHost() as any;
    const groups = hostGroups(snap.gpus.map((g: any) => gpuView(g, 'alice')));
    expect(groups.map(g => [g.host, g.gpus.length, g.totalBytes, g.leasedBytes])).toEqual([
      ['10.0.0.9', 2, 8 * GiB, GiB],
      ['10.0.0.10', 1, 4 * GiB, 2 * GiB]
    ]);
  });
  it("gives each machine's host memory and cores, parked copies and copies on disk", () => {
    const snap = multiHost() as any;
    snap.hosts[0] = {
      ...snap.hosts[0],
      host_memory: 64 * GiB,
      host_memory_leased: 12 * GiB,
      host_memory_parked: 2 * GiB,
      host_memory_spilled: GiB,
      cpus: 16,
      cpus_leased: 3.5
    };
    snap.hosts[1] = { ...snap.hosts[1], host_memory: null, host_memory_leased: GiB, cpus: null, cpus_leased: 1 };
    const vm = buildViewModel(snap, 1000);
    expect(vm.hostGroups.map(g => g.resources)).toEqual([
      '12.0 GiB of 64.0 GiB host memory booked, 2.0 GiB parked, 1.0 GiB on disk · 3.5 of 16 cores',
      '1.0 GiB host memory booked (no limit) · 1 cores booked (no limit)'
    ]);
    expect(hostResources({ host: 'old-broker', total_bytes: GiB })).toBeNull();
  });
  it("draws each machine's memory and cores in its header, one machine too", () => {
    const snap = multiHost() as any;
    snap.hosts[0] = { ...snap.hosts[0], host_memory: 64 * GiB, host_memory_leased: 12 * GiB, cpus: 16, cpus_leased: 4 };
    const history = new UsageHistory();
    const draw = (s: any) => {
      const vm = buildViewModel(s, 1000);
      return renderToStaticMarkup(React.createElement(GpuList, { gpus: vm.gpus, history, groups: vm.hostGroups }));
    };
    const html = draw(snap);
    expect(html).toContain('12.0 GiB of 64.0 GiB host memory booked · 4 of 16 cores');
    expect(html.match(/jp-GpuPanel-hostHeader/g)?.length).toBe(2);
    const one = { ...snap, gpus: snap.gpus.slice(0, 2), hosts: snap.hosts.slice(0, 1) };
    expect(draw(one)).toContain('12.0 GiB of 64.0 GiB host memory booked · 4 of 16 cores');
    const old = {
      ...one,
      hosts: [{ host: '10.0.0.9', workers: 2, gpus: [], total_bytes: 8 * GiB, leased_bytes: GiB }]
    };
    expect(draw(old)).not.toContain('jp-GpuPanel-hostHeader');
    const unbounded = { ...one, hosts: [{ ...one.hosts[0], host_memory: null, cpus: null }] };
    expect(draw(unbounded)).not.toContain('jp-GpuPanel-hostHeader');
  });
  it('makes one group of a one-machine pool (the list then draws no headings)', () => {
    const groups = hostGroups([gpuView(gpu('127.0.0.1', 1, 0), 'x'), gpuView(gpu('127.0.0.1', 2, 0), 'x')]);
    expect(groups.length).toBe(1);
  });
});

describe('clusterView', () => {
  it('shows pending jobs with Slurm state and reason, and jobs that ended by themselves', () => {
    const vm = buildViewModel(multiHost(), 1000);
    expect(vm.hostGroups.map(g => g.host)).toEqual(['10.0.0.9', '10.0.0.10']);
    expect(vm.cluster?.manager).toBe('Slurm (dask_jobqueue.SLURMCluster)');
    expect(vm.cluster?.mode).toBe('4 workers');
    expect(vm.cluster?.pending).toEqual([{ label: 'job 123', status: 'PENDING (Resources)', age: 60 }]);
    expect(vm.cluster?.ended).toEqual([{ label: 'job 121', status: 'TIMEOUT (TimeLimit)', age: 10 }]);
  });
  it('says adaptive bounds, and names a job without an id by its worker name', () => {
    const view = clusterView(
      {
        kind: 'dask',
        adaptive: { minimum: 0, maximum: 4 },
        jobs: [{ name: 'gpu-7', state: 'submitted', workers: 0 }],
        ended: []
      },
      0
    );
    expect(view?.mode).toBe('adaptive 0–4 workers');
    expect(view?.pending[0].label).toBe('gpu-7');
    expect(jobStatus({ name: 'x' })).toBe('submitted');
  });
  it('shows nothing for the embedded pool or a pool without a cluster manager', () => {
    expect(clusterView({ kind: 'embedded', jobs: [{ name: 'gpu-0', workers: 0 }] }, 0)).toBeNull();
    expect(clusterView(null, 0)).toBeNull();
  });
});
