/**
 * Notebook paths as this Jupyter server knows them.
 *
 * A kernel reports its notebook to the pool as Jupyter Server's ``JPY_SESSION_NAME``: an absolute path on
 * the kernel's machine (``/home/me/project/train.ipynb``). JupyterLab names documents by their path under
 * the server's root (``project/train.ipynb``), and only such a path opens the notebook ("go to cell"). Leases
 * and queued requests also carry the id of the kernel that made them, so for the kernels of this server the
 * panel takes the notebook's path from the server's own session of that kernel. Other kernels (another
 * server's, another machine's) keep the path they reported.
 */
import { ISnapshot } from './wire';

/** The server-relative notebook path of one of this server's kernels, or undefined for other kernels. */
export type KernelPaths = (kernel: string) => string | undefined;

/**
 * ``snapshot`` with the notebook of every lease and queued request made by one of this server's kernels
 * replaced by that kernel's session path; the same object when nothing changes.
 */
export function withServerNotebookPaths(snapshot: ISnapshot, pathOf: KernelPaths): ISnapshot {
  if (snapshot.state !== 'ok') {
    return snapshot;
  }
  let changed = false;
  const local = <T extends { kernel?: string; notebook?: string | null }>(item: T): T => {
    const path = item.kernel ? pathOf(item.kernel) : undefined;
    if (path === undefined || path === item.notebook) {
      return item;
    }
    changed = true;
    return { ...item, notebook: path };
  };
  const gpus = (snapshot.gpus ?? []).map(g => (g.leases ? { ...g, leases: g.leases.map(local) } : g));
  const queue = (snapshot.queue ?? []).map(local);
  return changed ? { ...snapshot, gpus, queue } : snapshot;
}
