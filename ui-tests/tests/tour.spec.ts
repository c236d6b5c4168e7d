/**
 * The shipped notebooks, run from the browser as a new user would, and the screenshots the docs show.
 *
 * notebooks/01-quickstart.ipynb and 02-scale-out.ipynb are uploaded as they are (into a folder named
 * "notebooks", as a user's checkout has them) and run cell by cell in a real JupyterLab against the tests'
 * embedded pool of two virtual 16 GiB GPUs (the kernel starts it). The scale-out cell is run twice, as a user
 * tuning it would. The panel is read at JupyterLab's default side bar width: names wrap instead of being cut,
 * the runs are newest first, each GPU has a chart over time with its axes. The screenshots land in the
 * test's output folder; asked to (docs-images.ts), the panel's also in docs/images/panel.png (the README's,
 * JUPYTER_GPU_DOCS_IMAGES=1), and with JUPYTER_GPU_DOCS_SHOTS=PREFIX in docs/images/ as
 * PREFIX-training-cell.png, PREFIX-panel.png and PREFIX-panel-runs.png (the before/after pictures of issue
 * 14 were taken so).
 */
import { expect, galata, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

import { docsImage, docsShot } from './docs-images';

const PANEL_ID = 'jupyter-gpu-panel';
const helper = path.join(__dirname, '..', 'pool_helper.py');
const python = process.env.PYTHON || 'python';
const NOTEBOOKS = path.join(__dirname, '..', '..', 'notebooks');
const CELL = 120000;

function poolHelper(...args: string[]): any {
  const out = execFileSync(python, [helper, ...args], { encoding: 'utf-8', stdio: ['ignore', 'pipe', 'inherit'] });
  return out.trim() ? JSON.parse(out) : null;
}

/** Save a screenshot in the test's output folder, and in docs/images when asked to. */
const keep = docsShot;

const FOLDER = 'notebooks';

async function openShipped(page: IJupyterLabPageFixture, name: string): Promise<void> {
  const text = fs.readFileSync(path.join(NOTEBOOKS, name), 'utf-8');
  await page.contents.uploadContent(text, 'text', `${FOLDER}/${name}`);
  await page.evaluate(async p => {
    await (window as any).jupyterapp.commands.execute('docmanager:open', { path: p, factory: 'Notebook' });
  }, `${FOLDER}/${name}`);
  await expect(page.activity.getTabLocator(name)).toBeVisible();
  expect(await page.notebook.activate(name)).toBe(true);
}

/** The index of the first cell whose source contains ``needle``. */
async function cellIndex(page: IJupyterLabPageFixture, needle: string): Promise<number> {
  const sources: string[] = await page.evaluate(() =>
    (window as any).jupyterapp.shell.currentWidget.content.widgets.map((c: any) => c.model.sharedModel.getSource())
  );
  const index = sources.findIndex(s => s.includes(needle));
  expect(index).toBeGreaterThanOrEqual(0);
  return index;
}

async function runUpTo(page: IJupyterLabPageFixture, last: number): Promise<void> {
  for (let i = 0; i <= last; i++) {
    expect(await page.notebook.runCell(i, { inplace: true, wait: true })).toBe(true);
  }
}

test.describe.configure({ mode: 'serial' });

test.describe('the shipped notebooks in the browser', () => {
  test.beforeAll(() => {
    poolHelper('stop');
  });

  test.afterAll(() => {
    poolHelper('stop');
  });

  test.afterEach(async ({ page }) => {
    await page.contents.deleteDirectory(FOLDER);
  });

  test('the quickstart trains with live progress, and the scale-out runs show in the panel', async ({ page }) => {
    test.setTimeout(420000);
    await openShipped(page, '01-quickstart.ipynb');
    const train = await cellIndex(page, '--name spirals');
    await runUpTo(page, train);
    const trainCell = (await page.notebook.getCellLocator(train))!;
    await expect(trainCell.locator('.jp-Cell-outputArea')).toContainText('trained on cpu', { timeout: CELL });
    await expect(trainCell.locator('.jp-Cell-outputArea')).toContainText('%%gpu done', { timeout: CELL });
    await trainCell.scrollIntoViewIfNeeded();
    const cellShot = test.info().outputPath('training-cell.png');
    await trainCell.screenshot({ path: cellShot });
    keep(cellShot, 'training-cell.png');

    await openShipped(page, '02-scale-out.ipynb');
    const two = await cellIndex(page, '--workers 2');
    await runUpTo(page, two);
    const twoCell = (await page.notebook.getCellLocator(two))!;
    await expect(twoCell.locator('.jp-Cell-outputArea')).toContainText('%%gpu done', { timeout: CELL });
    // a rerun of the same cell, as someone tuning it would
    expect(await page.notebook.runCell(two, { inplace: true, wait: true })).toBe(true);
    await expect(twoCell.locator('.jp-Cell-outputArea')).toContainText('%%gpu done', { timeout: CELL });

    await page.sidebar.openTab(PANEL_ID); // at JupyterLab's default side bar width
    const panel = page.locator(`#${PANEL_ID}`);
    const runs = panel.locator('.jp-GpuPanel-runs .jp-GpuPanel-run');
    await expect(runs).toHaveCount(2, { timeout: 30000 }); // the rerun is a run of its own, listed first
    await expect(runs.locator('.jp-GpuPanel-runTitle')).toHaveText(Array(2).fill('spirals-2 (2 GPUs)'));
    await expect(runs.locator('.jp-GpuPanel-runWhen')).toHaveText(
      Array(2).fill(/^02-scale-out\.ipynb · started \d\d:\d\d:\d\d · took \d+s$/)
    );
    const started = await runs.locator('.jp-GpuPanel-runWhen').allTextContents();
    expect(started[0] >= started[1]).toBe(true);
    await expect(runs.first().locator('.jp-GpuPanel-rankText')).toHaveText(Array(2).fill(/^120\/120 steps|^step 119/));

    // nothing is cut at the default width: names and labels wrap (a cut label is wider inside than out)
    const cut = await panel.evaluate(el =>
      [...el.querySelectorAll('.jp-GpuPanel-gpuName, .jp-GpuPanel-where, .jp-GpuPanel-runTitle, .jp-GpuPanel-summary')]
        .filter(e => e.scrollWidth > e.clientWidth + 1)
        .map(e => e.textContent)
    );
    expect(cut).toEqual([]);
    await expect(panel.locator('.jp-GpuPanel-gpuName').first()).toHaveText(/^Virtual GPU 0/);
    // leases of one notebook read apart: the session's cell, and each rank of a --workers run
    for (const card of await panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card').all()) {
      const where = await card.locator('.jp-GpuPanel-leases .jp-GpuPanel-where').allTextContents();
      expect(new Set(where).size).toBe(where.length);
    }
    // a chart over time per GPU, with its axes: 0/50%/100%, clock times, util and mem with their values
    const chart = panel.locator('.jp-GpuPanel-chart.jp-mod-gpu').first();
    await expect(chart.locator('.jp-GpuPanel-chartY span')).toHaveText(['0', '50%', '100%']);
    await expect(chart.locator('.jp-GpuPanel-chartX span')).toHaveText(Array(3).fill(/^\d\d:\d\d:\d\d$/));
    await expect(chart.locator('.jp-GpuPanel-legendLabel')).toHaveText(['util', 'mem']);
    expect(await chart.locator('polyline').first().getAttribute('points')).toMatch(/^[\d.]+,[\d.]+ [\d.]+,[\d.]+/);
    // and one for the users: the GPUs each held over time
    const users = panel.locator('.jp-GpuPanel-usageOverTime .jp-GpuPanel-chart');
    await expect(users.locator('.jp-GpuPanel-legendLabel').first()).toHaveText('panel-tester (me)');
    await expect(users.locator('.jp-GpuPanel-chartX span')).toHaveText(Array(3).fill(/^\d\d:\d\d:\d\d$/));

    const panelShot = test.info().outputPath('panel.png');
    await page.screenshot({ path: panelShot });
    keep(panelShot, 'panel.png');
    docsImage(panelShot, 'panel.png'); // the README's picture: real notebooks
    await panel.locator('.jp-GpuPanel-runs').scrollIntoViewIfNeeded();
    const runsShot = test.info().outputPath('panel-runs.png');
    await page.screenshot({ path: runsShot });
    keep(runsShot, 'panel-runs.png');
  });
});

// keep `galata` imported for its fixtures' types in editors
void galata;
