/**
 * What a newcomer reads in a notebook when a %%gpu cell goes wrong, in a real JupyterLab against the tests'
 * embedded pool (see notebooks.spec.ts for how kernels find it): an interrupted cell's traceback shows the
 * cell's own lines and none of jupyter-gpu's (no `get_ipython().run_cell_magic(...)` line), a value that
 * stayed on the GPU says how to get it when it is used here, printing 100 MB shows output and one note (the
 * Jupyter server's own rate limit never trips), the panel's Cancel asks before ending a session that holds
 * variables, and a waiting cell says what its estimated start rests on.
 *
 * With JUPYTER_GPU_DOCS_SHOTS=PREFIX the traceback and the waiting cell are also saved as
 * docs/images/PREFIX-traceback.png and PREFIX-estimate.png (docs-images.ts): the before/after pictures of
 * issue 22 were taken so, "before" with the Python package of the commit before it on PYTHONPATH.
 */
import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import { execFileSync } from 'child_process';
import * as path from 'path';

import { docsShot } from './docs-images';

const PANEL_ID = 'jupyter-gpu-panel';
const helper = path.join(__dirname, '..', 'pool_helper.py');
const python = process.env.PYTHON || 'python';
const POOL_START = 60000;
const CELL = 60000;
const CONNECT = '%load_ext jupyter_gpu\n%gpu connect --keep';

function poolHelper(...args: string[]): void {
  execFileSync(python, [helper, ...args], { encoding: 'utf-8', stdio: ['ignore', 'pipe', 'inherit'] });
}

function notebookJson(cells: string[]): string {
  return JSON.stringify({
    cells: cells.map((source, i) => ({
      cell_type: 'code',
      id: `c${i}`,
      metadata: {},
      execution_count: null,
      outputs: [],
      source
    })),
    metadata: { kernelspec: { name: 'python3', display_name: 'Python 3 (ipykernel)', language: 'python' } },
    nbformat: 4,
    nbformat_minor: 5
  });
}

async function openNotebook(page: IJupyterLabPageFixture, tmpPath: string, name: string, cells: string[]) {
  await page.contents.uploadContent(notebookJson(cells), 'text', `${tmpPath}/${name}`);
  await page.evaluate(async p => {
    await (window as any).jupyterapp.commands.execute('docmanager:open', { path: p, factory: 'Notebook' });
  }, `${tmpPath}/${name}`);
  await expect(page.activity.getTabLocator(name)).toBeVisible();
  expect(await page.notebook.activate(name)).toBe(true);
}

/**
 * Run one cell of the active notebook by its index; `wait: false` returns at once. Through the notebook's own
 * command: the cell is chosen by index, whatever has the focus.
 */
async function runCell(page: IJupyterLabPageFixture, index: number, wait = true): Promise<void> {
  await page.evaluate(
    async ({ i, w }) => {
      const app = (window as any).jupyterapp;
      app.shell.currentWidget.content.activeCellIndex = i;
      const done = app.commands.execute('notebook:run-cell');
      if (w) {
        await done;
      }
    },
    { i: index, w: wait }
  );
}

/**
 * Interrupt the active notebook's kernel through the server's REST API, from the test (galata's tracking of
 * the page's kernel requests fails on the interrupt's empty reply).
 */
async function interrupt(page: IJupyterLabPageFixture): Promise<void> {
  const kernel = await page.evaluate(() => (window as any).jupyterapp.shell.currentWidget.sessionContext.session.kernel.id);
  const reply = await page.request.post(`/api/kernels/${kernel}/interrupt`);
  expect(reply.status()).toBe(204);
}

async function output(page: IJupyterLabPageFixture, index: number): Promise<Locator> {
  const cell = await page.notebook.getCellLocator(index);
  expect(cell).not.toBeNull();
  return cell!.locator('.jp-Cell-outputArea');
}

async function connect(page: IJupyterLabPageFixture): Promise<void> {
  await runCell(page, 0);
  await expect(await output(page, 0)).toContainText('Connected to the embedded pool', { timeout: POOL_START });
}

test.describe.configure({ mode: 'serial' });

test.describe('what a %%gpu cell shows when it goes wrong', () => {
  test.beforeAll(() => {
    poolHelper('stop');
  });

  test.afterEach(() => {
    poolHelper('clear');
  });

  test.afterAll(() => {
    poolHelper('stop');
  });

  test("an interrupted cell's traceback shows its own lines, and a remote value says how to get it", async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(240000);
    await openNotebook(page, tmpPath, 'errors.ipynb', [
      CONNECT,
      '%%gpu --name sleeper\nimport time\nprint("sleeping", flush=True)\nfor step in range(600):\n    time.sleep(0.2)',
      '%%gpu\nimport torch, jupyter_gpu\nx = torch.linspace(0, 1, 5)\ny_pred = (x * 2).to(jupyter_gpu.device())',
      'import matplotlib.pyplot as plt\nplt.plot(x, y_pred.detach())'
    ]);
    await connect(page);

    // interrupt the kernel while the remote loop runs: the traceback is the cell's, as it would read locally
    await runCell(page, 1, false);
    const interrupted = await output(page, 1);
    await expect(interrupted).toContainText('sleeping', { timeout: CELL });
    await interrupt(page);
    const error = interrupted.locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').last();
    await expect(error).toContainText('KeyboardInterrupt', { timeout: CELL });
    const shot = test.info().outputPath('traceback.png');
    await (await page.notebook.getCellLocator(1))!.screenshot({ path: shot });
    docsShot(shot, 'traceback.png'); // before the checks: the "before" picture is of a failing run
    await expect(error).toContainText('time.sleep(0.2)');
    await expect(error).not.toContainText('run_cell_magic');
    await expect(error).not.toContainText('jupyter_gpu');

    // a tensor on the device stays in the session; used here, it says what it is and how to get it
    await runCell(page, 2);
    await expect(await output(page, 2)).toContainText('%%gpu done in', { timeout: CELL });
    await runCell(page, 3);
    const hint = await output(page, 3);
    await expect(hint).toContainText('Traceback', { timeout: CELL });
    const hintShot = test.info().outputPath('remote-value-hint.png');
    await (await page.notebook.getCellLocator(3))!.screenshot({ path: hintShot });
    docsShot(hintShot, 'remote-value-hint.png'); // before the checks, as above
    await expect(hint).toContainText('RemoteAttributeError');
    await expect(hint).toContainText('y_pred is not here, it is a placeholder for a torch.Tensor');
    await expect(hint).toContainText('`%gpu pull y_pred`');
    await expect(hint).toContainText('`%%gpu --out y_pred`');
    await expect(hint).not.toContainText('remote_value.py');
  });

  test('printing 100 MB shows output and one note; Cancel asks before ending a session with variables', async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(240000);
    await openNotebook(page, tmpPath, 'flood.ipynb', [
      CONNECT,
      '%%gpu --name flood\nkept = 42\nfor i in range(100):\n    print(str(i) * (2**20 // len(str(i))))'
    ]);
    await connect(page);
    await runCell(page, 1);
    const flood = await output(page, 1);
    await expect(flood).toContainText('%%gpu done in', { timeout: CELL });
    await expect(flood).toContainText('000000'); // its output is shown
    const text = (await flood.textContent())!;
    expect(text.match(/\[jupyter-gpu\] \d+ line\(s\)/g)?.length).toBe(1);
    expect(text).toContain('jupyter-gpu.session.output-rate');
    expect(text).not.toContain('IOPub data rate exceeded'); // the Jupyter server's own message

    // the session ran a cell (kept = 42 lives there): the panel's Cancel asks first
    await page.sidebar.openTab(PANEL_ID);
    await page.sidebar.setWidth(380, 'left');
    const mine = page.locator(`#${PANEL_ID} .jp-GpuPanel-mine`);
    await expect(mine.locator('h3')).toHaveText('My sessions (1)', { timeout: 15000 });
    const cancel = mine.locator('li[data-lease-id]').getByRole('button', { name: 'Cancel' });
    await cancel.click();
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText(/End GPU session L\w+\?/);
    await expect(dialog).toContainText('Its variables are lost');
    await dialog.getByRole('button', { name: 'Keep it' }).click();
    await expect(dialog).toHaveCount(0);
    await expect(mine.locator('h3')).toHaveText('My sessions (1)');
    await cancel.click();
    await page.locator('.jp-Dialog').getByRole('button', { name: 'End session' }).click();
    await expect(mine.locator('h3')).toHaveText('My sessions (0)', { timeout: 15000 });
  });

  test("a waiting cell's estimated start says what it rests on", async ({ page, tmpPath }) => {
    test.setTimeout(300000);
    // three notebooks of one user: "holder" has a history of 10 s cells
    await openNotebook(page, tmpPath, 'holder.ipynb', [
      CONNECT,
      '%%gpu --gpus 1 --name step\nimport time\ntime.sleep(10)',
      '%%gpu --name train\nimport time\nprint("training", flush=True)\ntime.sleep(60)'
    ]);
    await connect(page);
    for (let i = 0; i < 3; i++) {
      await runCell(page, 1);
      await expect(await output(page, 1)).toContainText('%%gpu done in', { timeout: CELL });
    }
    await openNotebook(page, tmpPath, 'other.ipynb', [
      CONNECT,
      '%%gpu --gpus 1 --name other\nimport time\nprint("busy", flush=True)\ntime.sleep(60)'
    ]);
    await connect(page);
    await openNotebook(page, tmpPath, 'waiter.ipynb', [CONNECT, '%%gpu --gpus 1 --name waiter\nprint("ran")']);
    await connect(page);
    // both GPUs run a cell that reports nothing; a third cell asks for a whole GPU
    expect(await page.notebook.activate('other.ipynb')).toBe(true);
    await runCell(page, 1, false);
    await expect(await output(page, 1)).toContainText('busy', { timeout: CELL });
    expect(await page.notebook.activate('holder.ipynb')).toBe(true);
    await runCell(page, 2, false);
    await expect(await output(page, 2)).toContainText('training', { timeout: CELL });
    expect(await page.notebook.activate('waiter.ipynb')).toBe(true);
    await runCell(page, 1, false);
    const waiting = await output(page, 1);
    await expect(waiting).toContainText(/%%gpu queued \(R\w+, 1 whole GPU\): position 1 of 1/, { timeout: CELL });
    await page.waitForTimeout(1500); // the badge's next refresh
    const shot = test.info().outputPath('estimate.png');
    await (await page.notebook.getCellLocator(1))!.screenshot({ path: shot });
    docsShot(shot, 'estimate.png'); // before the checks: the "before" picture is of a failing run
    await expect(waiting).toContainText(
      /estimated start in \d+ s \(median of panel-tester's last \d+ cells( that ran over \d+ s)?: 10 s, then 600 s idle/
    );
  });
});
