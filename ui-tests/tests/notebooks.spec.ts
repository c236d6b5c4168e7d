/**
 * Real notebooks, real kernels, the real pool: `%%gpu` cells run from the browser and the panel shows them.
 *
 * Each notebook is uploaded into the test's folder and opened in JupyterLab, so its kernel is an ordinary
 * Jupyter kernel of the test server: it inherits the server's environment (JUPYTER_RUNTIME_DIR,
 * JUPYTER_GPU_VIRTUAL_GPUS=2x16GiB, JUPYTER_GPU_USER=panel-tester; see playwright.config.js), so its
 * `%gpu connect --keep` starts (or joins) the same embedded pool of two virtual 16 GiB GPUs that the panel
 * shows. The pool is started with --keep so that it outlives the kernels of one test (galata shuts them down
 * after each test); afterEach cancels whatever a test left on the pool and afterAll stops the pool, so the
 * panel tests (panel.spec.ts, which begin with "no pool") find the runtime directory as they expect.
 */
import { expect, galata, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import { execFileSync } from 'child_process';
import * as path from 'path';

import { docsImage } from './docs-images';

const PANEL_ID = 'jupyter-gpu-panel';
const helper = path.join(__dirname, '..', 'pool_helper.py');
const python = process.env.PYTHON || 'python';
/** Starting the pool and a kernel's first `%%gpu` cell (a session process) take ~10-20 s on a small machine. */
const POOL_START = 60000;
const CELL = 45000;

/** Relative luminance (0 black .. 1 white) of a computed `rgb(...)` / `rgba(...)` colour. */
function luminance(colour: string): number {
  const [r, g, b] = colour
    .match(/[\d.]+/g)!
    .slice(0, 3)
    .map(v => {
      const c = Number(v) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}


function poolHelper(...args: string[]): any {
  const out = execFileSync(python, [helper, ...args], { encoding: 'utf-8', stdio: ['ignore', 'pipe', 'inherit'] });
  return out.trim() ? JSON.parse(out) : null;
}

/** The first cell of every notebook here: load the magic and join the tests' pool (starting it if needed). */
const CONNECT = '%load_ext jupyter_gpu\n%gpu connect --keep';

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
    // naming the kernel spares the "select a kernel" dialog
    metadata: { kernelspec: { name: 'python3', display_name: 'Python 3 (ipykernel)', language: 'python' } },
    nbformat: 4,
    nbformat_minor: 5
  });
}

/**
 * Upload a notebook into the test's folder and open it (its kernel starts). Opened by command, not through
 * the file browser, which is hidden while the GPU panel has the left side bar.
 */
async function openNotebook(page: IJupyterLabPageFixture, tmpPath: string, name: string, cells: string[]) {
  await page.contents.uploadContent(notebookJson(cells), 'text', `${tmpPath}/${name}`);
  await page.evaluate(async p => {
    await (window as any).jupyterapp.commands.execute('docmanager:open', { path: p, factory: 'Notebook' });
  }, `${tmpPath}/${name}`);
  await expect(page.activity.getTabLocator(name)).toBeVisible();
  expect(await page.notebook.activate(name)).toBe(true);
}

/** Run one cell of the active notebook; `wait: false` returns at once (for a cell that will wait in the queue). */
async function runCell(page: IJupyterLabPageFixture, index: number, wait = true): Promise<void> {
  expect(await page.notebook.runCell(index, { inplace: true, wait })).toBe(true);
}

async function output(page: IJupyterLabPageFixture, index: number): Promise<Locator> {
  const cell = await page.notebook.getCellLocator(index);
  expect(cell).not.toBeNull();
  return cell!.locator('.jp-Cell-outputArea');
}

async function openPanel(page: IJupyterLabPageFixture): Promise<Locator> {
  await page.sidebar.openTab(PANEL_ID);
  await page.sidebar.setWidth(380, 'left');
  return page.locator(`#${PANEL_ID}`);
}

test.describe.configure({ mode: 'serial' });

test.describe('%%gpu notebooks and the panel', () => {
  test.beforeAll(() => {
    poolHelper('stop'); // a pool some earlier run left (another spec, an interrupted run): start from none
  });

  test.afterEach(() => {
    poolHelper('clear'); // leases and requests the test's kernels left (galata then shuts the kernels down)
  });

  test.afterAll(() => {
    poolHelper('stop');
  });

  test('a %%gpu cell starts the pool, runs there, and its session shows under My sessions', async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(120000);
    const panel = await openPanel(page);
    await expect(panel.locator('.jp-GpuPanel-noPool')).toBeVisible({ timeout: 30000 });

    await openNotebook(page, tmpPath, 'warm.ipynb', [
      CONNECT,
      '%%gpu --gpus 1 --name warm\nimport os\nprint("hello from the pool, pid", os.getpid())'
    ]);
    // the kernel starts the embedded pool in the tests' runtime directory, where the panel looks for it
    await runCell(page, 0);
    await expect(await output(page, 0)).toContainText(
      /Connected to the embedded pool at (tcp|tls):\/\/127\.0\.0\.1:\d+: 2 GPU\(s\) \(virtual\), user panel-tester\./,
      { timeout: POOL_START }
    );
    const cards = panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card');
    await expect(cards).toHaveCount(2, { timeout: 30000 });

    await runCell(page, 1);
    const out = await output(page, 1);
    await expect(out).toContainText('hello from the pool, pid', { timeout: CELL });
    await expect(out).toContainText(
      /%%gpu done in [\d.]+ s \((waited [\d.]+ s|no wait) for its GPU\) on .+ \(1 of a GPU, lease L\w+, isolation none\)/,
      {
        timeout: CELL
      }
    );
    const lease = (await out.textContent())!.match(/lease (L\w+)/)![1];

    // the panel: my session (notebook › cell name), its lease on one card, my share in the status bar
    const mine = panel.locator('.jp-GpuPanel-mine');
    await expect(mine.locator('h3')).toHaveText('My sessions (1)', { timeout: 15000 });
    const session = mine.locator(`li[data-lease-id="${lease}"]`);
    // the notebook by its path on this server (the kernel reports an absolute path; the panel maps its kernel)
    await expect(session.locator('.jp-GpuPanel-where')).toHaveText(`${tmpPath}/warm.ipynb › warm`);
    // the session measured its peak (a few KiB for a print): the panel suggests a smaller request
    await expect(session.locator('.jp-GpuPanel-usage')).toHaveText(/^peak [\d.]+ KiB of 16\.0 GiB reserved$/);
    await expect(session.locator('.jp-GpuPanel-rightSize')).toHaveText(/of 16\.0 GiB: ask --memory 256MiB next time$/);
    const row = panel.locator(`.jp-GpuPanel-leases li[data-lease-id="${lease}"]`);
    await expect(row).toContainText('panel-tester');
    await expect(row.locator('.jp-GpuPanel-fraction')).toHaveText('1');
    await expect(row.locator('.jp-GpuPanel-where')).toHaveText(`${tmpPath}/warm.ipynb › warm`);
    await expect(
      cards.filter({ has: page.locator(`li[data-lease-id="${lease}"]`) }).locator('.jp-GpuPanel-memText')
    ).toContainText('16.0 GiB of 16.0 GiB leased');
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: 1 of 2');
    await page.screenshot({ path: test.info().outputPath('notebook-session.png') });

    // "go to cell" on a real notebook's session: the notebook's %%gpu --name warm cell becomes active
    await page.evaluate(() => ((window as any).jupyterapp.shell.currentWidget.content.activeCellIndex = 0));
    await session.locator('.jp-GpuPanel-goto').click();
    await expect
      .poll(() =>
        page.evaluate(() => {
          const widget = (window as any).jupyterapp.shell.currentWidget;
          return widget?.context?.path + ':' + widget?.content?.activeCellIndex;
        })
      )
      .toBe(`${tmpPath}/warm.ipynb:1`);
  });

  test('two kernels contend for the last GPU: the queue with its reason, Cancel from the panel, release', async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(150000);
    const panel = await openPanel(page);
    // two notebooks take one whole virtual GPU each ...
    for (const name of ['holder', 'second']) {
      await openNotebook(page, tmpPath, `${name}.ipynb`, [
        CONNECT,
        `%%gpu --gpus 1 --name ${name}\nprint("${name} holds a GPU")`,
        '%gpu release'
      ]);
      await runCell(page, 0);
      await expect(await output(page, 0)).toContainText('Connected to the embedded pool', { timeout: POOL_START });
      await runCell(page, 1);
      await expect(await output(page, 1)).toContainText(`${name} holds a GPU`, { timeout: CELL });
      await expect(await output(page, 1)).toContainText('%%gpu done in', { timeout: CELL });
    }
    const mine = panel.locator('.jp-GpuPanel-mine');
    await expect(mine.locator('h3')).toHaveText('My sessions (2)', { timeout: 15000 });
    await expect(panel.locator('.jp-GpuPanel-memText')).toHaveText(Array(2).fill(/16\.0 GiB of 16\.0 GiB leased/));

    // ... so a third one's %%gpu --gpus 1 waits in the queue, and its badge says where and why
    await openNotebook(page, tmpPath, 'third.ipynb', [CONNECT, '%%gpu --gpus 1 --name third\nprint("never printed")']);
    await runCell(page, 0);
    await expect(await output(page, 0)).toContainText('Connected to the embedded pool', { timeout: POOL_START });
    await runCell(page, 1, false);
    const waiting = await output(page, 1);
    await expect(waiting).toContainText(/%%gpu queued \(R\w+, 1 whole GPU\): position 1 of 1, waiting: \S/, {
      timeout: CELL
    });
    const badge = (await waiting.textContent())!.match(
      /queued \((R\w+), 1 whole GPU\): position 1 of 1, (.+?)(, estimated start| \[)/
    )!;
    const [request, reason] = [badge[1], badge[2]];

    const queue = panel.locator('.jp-GpuPanel-queue');
    await expect(queue.locator('h3')).toHaveText('Queue (1)');
    const item = queue.locator(`li[data-request-id="${request}"]`);
    await expect(item.locator('.jp-GpuPanel-position')).toHaveText('#1');
    await expect(item.locator('.jp-GpuPanel-user')).toHaveText('panel-tester');
    await expect(item.locator('.jp-GpuPanel-request')).toHaveText('1 whole GPU');
    // the reason may count down ("... move to host memory for it in 591 s if they stay idle"): the badge and
    // the panel read it a moment apart, so the seconds match as any number (CI failed on 591 vs 590)
    const escaped = reason.replace(/[.*+?^${}()|[\]\\]/g, '\\$&').replace(/ in \d+ s /g, ' in \\d+ s ');
    await expect(item.locator('.jp-GpuPanel-reason')).toHaveText(new RegExp(`^${escaped}$`));
    await expect(item.locator('.jp-GpuPanel-sub')).toContainText(` · ${tmpPath}/third.ipynb`);
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: 2 of 2 · 1 queued (#1)');
    await page.screenshot({ path: test.info().outputPath('notebook-queued.png') });

    // Cancel from the panel: the request leaves the queue and the waiting cell ends with a clear error
    await item.getByRole('button', { name: 'Cancel' }).click();
    await expect(queue.locator('h3')).toHaveText('Queue (0)', { timeout: 15000 });
    await expect(queue.locator('.jp-GpuPanel-empty')).toHaveText('Nobody is waiting.');
    await expect(waiting).toContainText(
      `GpuPoolError: The GPU request ${request} ended without a grant: cancelled by its owner`,
      { timeout: 15000 }
    );
    await expect(waiting).not.toContainText('never printed');
    await page.screenshot({ path: test.info().outputPath('notebook-cancelled.png') });
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: 2 of 2');

    // %gpu release in the two holders ends their sessions: nothing of mine is left on the pool
    for (const name of ['holder', 'second']) {
      expect(await page.notebook.activate(`${name}.ipynb`)).toBe(true);
      await runCell(page, 2);
      await expect(await output(page, 2)).toContainText(/Released your GPU session \(lease L\w+\)/);
    }
    await expect(mine.locator('h3')).toHaveText('My sessions (0)', { timeout: 15000 });
    await expect(panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-empty')).toHaveText(['idle', 'idle'], {
      timeout: 15000
    });
  });

  test('a %%gpu --workers 2 run shows per-rank progress, and its rerun is a run of its own', async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(200000);
    const panel = await openPanel(page);
    await openNotebook(page, tmpPath, 'spread.ipynb', [
      CONNECT,
      [
        '%%gpu --workers 2 --name spread',
        'import time, jupyter_gpu',
        'steps = 20',
        'for i in range(steps):',
        '    time.sleep(0.4)',
        '    jupyter_gpu.report(step=i + 1, total=steps, loss=1.0 / (i + 1))',
        'print(f"rank {jupyter_gpu.rank()} of {jupyter_gpu.world_size()} finished")'
      ].join('\n')
    ]);
    await runCell(page, 0);
    await expect(await output(page, 0)).toContainText('Connected to the embedded pool', { timeout: POOL_START });
    await runCell(page, 1, false);

    const runs = panel.locator('.jp-GpuPanel-runs .jp-GpuPanel-run').filter({ hasText: 'spread (2 GPUs)' });
    const run = runs.first();
    const ranks = run.locator('.jp-GpuPanel-rank');
    // while it runs: one progress bar per rank, each with its step
    await expect(ranks).toHaveCount(2, { timeout: CELL });
    await expect(ranks.locator('.jp-GpuPanel-rankLabel')).toHaveText(['rank 0', 'rank 1']);
    await expect(ranks.locator('.jp-GpuPanel-rankText')).toHaveText(Array(2).fill(/^\d+\/20 steps · loss /), {
      timeout: CELL
    });
    // live: rank 0 is seen part-way (the loop takes 8 s; the panel updates every 0.5 s)
    await expect(ranks.locator('.jp-GpuPanel-rankText').first()).toHaveText(/^(1?\d)\/20 steps · loss /);
    await expect(run.locator('.jp-GpuPanel-state')).toHaveText('running');
    await expect(run.locator('.jp-GpuPanel-runWhen')).toHaveText(
      /^spread\.ipynb · started \d\d:\d\d:\d\d · running for \d+s$/
    );
    await run.scrollIntoViewIfNeeded();
    await page.screenshot({ path: test.info().outputPath('notebook-scale-out-running.png') });

    // finished: both ranks at 20/20, rank 0's loss curve, and the cell shows both ranks' output
    const out = await output(page, 1);
    await expect(out).toContainText('%%gpu done: 2 ranks in', { timeout: CELL });
    await expect(out).toContainText('rank 0 of 2 finished');
    await expect(out).toContainText('[rank 1] rank 1 of 2 finished');
    await expect(out).toContainText(
      /; rank 0: 20\/20 steps \(100%\) · [\d.]+ steps\/s · loss=0\.05; rank 1: 20\/20 steps/
    );
    await expect(run.locator('.jp-GpuPanel-state')).toHaveText('done', { timeout: 15000 });
    await expect(ranks.locator('.jp-GpuPanel-rankText')).toHaveText(Array(2).fill('20/20 steps · loss 0.0500'), {
      timeout: 15000
    });
    for (const bar of await ranks.locator('progress').all()) {
      await expect(bar).toHaveJSProperty('value', 1);
    }
    await expect(run.locator('.jp-GpuPanel-sparkline.jp-mod-loss')).toBeVisible();
    await expect(run.locator('.jp-GpuPanel-metricLabel')).toHaveText('loss 0.0500 (from 1.00)');
    await expect(run.locator('.jp-GpuPanel-runWhen')).toHaveText(
      /^spread\.ipynb · started \d\d:\d\d:\d\d · took \d+s$/
    );
    // the gang's leases were freed with the run
    await expect(panel.locator('.jp-GpuPanel-mine h3')).toHaveText('My sessions (0)', { timeout: 15000 });
    await run.screenshot({ path: test.info().outputPath('panel-scale-out-run.png') });

    // the same cell again (a rerun): a second card, first in the list, not a spike on the first run's curve
    const firstId = await run.getAttribute('data-run-id');
    await runCell(page, 1, false);
    await expect(runs).toHaveCount(2, { timeout: CELL });
    await expect(runs.first()).not.toHaveAttribute('data-run-id', firstId!);
    await expect(runs.nth(1)).toHaveAttribute('data-run-id', firstId!);
    await expect(runs.nth(1).locator('.jp-GpuPanel-state')).toHaveText('done');
    await expect(runs.first().locator('.jp-GpuPanel-state')).toHaveText('done', { timeout: CELL });
    await expect(runs.first().locator('.jp-GpuPanel-rankText')).toHaveText(Array(2).fill('20/20 steps · loss 0.0500'));
  });

  test('a training cell shows a progress bar widget with its rate and time left, and tqdm the same', async ({
    page,
    tmpPath
  }) => {
    test.setTimeout(150000);
    await openNotebook(page, tmpPath, 'progress.ipynb', [
      CONNECT,
      [
        '%%gpu --name train',
        'import time, jupyter_gpu',
        'for step in range(60):',
        '    time.sleep(0.2)',
        '    if step % 5 == 0 or step == 59:',
        '        jupyter_gpu.report(step=step, total=60, loss=1.0 / (step + 1))'
      ].join('\n'),
      [
        '%%gpu',
        'import time',
        'from tqdm.auto import tqdm',
        "for i in tqdm(range(30), desc='epochs'):",
        '    time.sleep(0.1)'
      ].join('\n')
    ]);
    await runCell(page, 0);
    await expect(await output(page, 0)).toContainText('Connected to the embedded pool', { timeout: POOL_START });
    await runCell(page, 1, false);
    const out = await output(page, 1);
    // an ipywidgets bar, updated in place while the cell runs: share done, steps per second, time left
    const bar = out.locator('.jupyter-gpu-progress-bar');
    await expect(bar).toBeVisible({ timeout: CELL });
    const text = out.locator('.jupyter-gpu-progress-text');
    await expect(text).toHaveText(/^\d+\/60 steps \(\d+%\) · [\d.]+ steps\/s · \d+ s left · loss=/, { timeout: CELL });
    await out.scrollIntoViewIfNeeded();
    const cell = (await page.notebook.getCellLocator(1))!;
    const shot = test.info().outputPath('progress-widget-running.png');
    await cell.screenshot({ path: shot });
    docsImage(shot, 'progress-widget.png'); // the docs' picture, when asked to (docs-images.ts)
    await expect(text).toHaveText(/^60\/60 steps \(100%\) · [\d.]+ steps\/s · loss=0\.01667$/, { timeout: CELL });
    await expect(out.locator('.jupyter-gpu-progress-curve svg polyline')).toHaveCount(1);
    await expect(out).toContainText('%%gpu done in');
    await expect(out.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).toHaveCount(0);

    // tqdm.auto in a cell: the same bar, not a red text bar on stderr
    await runCell(page, 2);
    const tq = await output(page, 2);
    await expect(tq.locator('.jupyter-gpu-progress-text')).toHaveText(/^30\/30 steps \(100%\) · /, { timeout: CELL });
    await expect(tq.locator('.jupyter-gpu-progress-bar')).toBeVisible();
    await expect(tq).toContainText('rank 0 · epochs');
    await expect(tq.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).toHaveCount(0);
  });

  test('the panel follows the JupyterLab Dark theme', async ({ page }) => {
    test.setTimeout(90000);
    const panel = await openPanel(page);
    const content = panel.locator('.jp-GpuPanel-content');
    await expect(content).toHaveAttribute('data-state', /^(ok|no-pool)$/, { timeout: 30000 });
    if ((await content.getAttribute('data-state')) === 'no-pool') {
      await panel.getByRole('button', { name: 'Start pool' }).click(); // this test run on its own
    }
    await expect(panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card')).toHaveCount(2, { timeout: POOL_START });
    const colours = () =>
      panel.evaluate(el => {
        const card = el.querySelector('.jp-GpuPanel-card')!;
        return {
          panel: getComputedStyle(el).backgroundColor,
          text: getComputedStyle(el).color,
          card: getComputedStyle(card).backgroundColor
        };
      });
    const light = await colours();
    await panel.screenshot({ path: test.info().outputPath('panel-light.png') });

    await page.theme.setDarkTheme();
    await expect.poll(async () => (await colours()).panel).not.toBe(light.panel);
    const dark = await colours();
    await panel.screenshot({ path: test.info().outputPath('panel-dark.png') });
    expect(luminance(light.panel)).toBeGreaterThan(0.7);
    expect(luminance(dark.panel)).toBeLessThan(0.2);
    expect(luminance(dark.text)).toBeGreaterThan(luminance(dark.panel) + 0.4); // light text on the dark panel
    expect(dark.card).not.toBe(light.card);
    await page.theme.setLightTheme();
  });
});

// keep `galata` imported for its fixtures' types in editors
void galata;
