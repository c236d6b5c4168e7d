/**
 * jupyter-gpu's JupyterLab plugin: the GPU side panel, its status bar item, and the "open" command.
 */
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { SnapshotFeed } from './client';
import { validFraction } from './validate';
import { KernelPaths, withServerNotebookPaths } from './notebooks';
import { GpuPanel, IPanelActions } from './panel';
import { GpuStatus } from './statusbar';

const PLUGIN_ID = 'jupyter-gpu:plugin';
const OPEN_COMMAND = 'jupyter-gpu:open';

/** Whether a notebook cell is the one a lease names: its cell id, or its ``%%gpu --name NAME``. */
function cellMatches(source: string, id: string, wanted: string): boolean {
  if (id === wanted) {
    return true;
  }
  const first = source.split('\n', 1)[0] ?? '';
  if (!first.startsWith('%%gpu')) {
    return false;
  }
  const m = first.match(/--name[ =](?:"([^"]+)"|'([^']+)'|(\S+))/);
  return !!m && (m[1] ?? m[2] ?? m[3]) === wanted;
}

function goToCellAction(docManager: IDocumentManager): IPanelActions['goToCell'] {
  return async (notebook: string, cell: string | null) => {
    const widget = docManager.openOrReveal(notebook);
    if (!widget || !(widget instanceof NotebookPanel)) {
      return;
    }
    await widget.context.ready;
    await widget.revealed;
    if (!cell) {
      return;
    }
    const content = widget.content;
    const index = content.widgets.findIndex(w => cellMatches(w.model.sharedModel.getSource(), w.model.id, cell));
    if (index < 0) {
      return;
    }
    content.activeCellIndex = index;
    await content.scrollToItem(index, 'center');
  };
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GPU pool side panel: GPUs, leases, queue, my sessions, scale-out runs.',
  autoStart: true,
  optional: [ILabShell, ILayoutRestorer, ISettingRegistry, IStatusBar, IDocumentManager, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null,
    statusBar: IStatusBar | null,
    docManager: IDocumentManager | null,
    palette: ICommandPalette | null
  ) => {
    // leases name their notebook by its path on the kernel's machine: for this server's kernels, use the
    // document path of the kernel's session instead (shown, and opened by "go to cell")
    const sessions = app.serviceManager.sessions;
    const kernelPaths: KernelPaths = kernel => {
      for (const session of sessions.running()) {
        if (session.kernel?.id === kernel) {
          return session.path;
        }
      }
      return undefined;
    };
    const feed = new SnapshotFeed({
      interval: 1,
      transform: snapshot => withServerNotebookPaths(snapshot, kernelPaths)
    });
    const panel = new GpuPanel({
      feed,
      actions: { goToCell: docManager ? goToCellAction(docManager) : undefined }
    });
    app.shell.add(panel, 'left', { rank: 600 });
    if (restorer) {
      restorer.add(panel, 'jupyter-gpu-panel');
    }
    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Show GPU Pool Panel',
      caption: 'Open the jupyter-gpu side panel',
      // the command takes no arguments; saying so lets callers of the command registry check theirs
      describedBy: { args: { type: 'object', properties: {} } },
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: OPEN_COMMAND, category: 'GPU' });
    }
    if (statusBar) {
      statusBar.registerStatusItem(PLUGIN_ID, {
        item: new GpuStatus(feed, () => app.shell.activateById(panel.id)),
        align: 'left',
        rank: 4
      });
    }
    if (settingRegistry) {
      const apply = (settings: ISettingRegistry.ISettings) => {
        const rate = settings.get('updateRate').composite as number;
        if (typeof rate === 'number' && rate > 0) {
          feed.setInterval(rate);
        }
        const fraction = validFraction(settings.get('defaultFraction').composite);
        if (fraction !== null) {
          panel.defaultFraction = fraction;
        }
      };
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          apply(settings);
          settings.changed.connect(apply);
        })
        .catch(reason => console.error('jupyter-gpu: cannot load settings', reason));
    }
    void app.restored.then(() => feed.start());
    console.debug('jupyter-gpu panel activated', labShell ? '(lab shell)' : '');
  }
};

export default plugin;
