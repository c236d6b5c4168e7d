/**
 * The GPU panel in a real JupyterLab, against a real embedded pool of two virtual 16 GiB GPUs.
 *
 * One serial flow, because it walks the pool's life: no pool → Start (from the panel) → GPU cards →
 * real leases and queued requests (made through the broker, as kernels make them) → Cancel from the panel.
 * The pool has quotas (pool-quotas.yaml: one team per test user, 1 GPU guaranteed each, no limits), so the
 * Quotas section, and the preemptible mark on what a team holds beyond its guarantee, are real too.
 */
import { expect, galata, test } from '@jupyterlab/galata';
import { execFileSync } from 'child_process';
import * as path from 'path';

const PANEL_ID = 'jupyter-gpu-panel';
const MiB = 2 ** 20;
const helper = path.join(__dirname, '..', 'pool_helper.py');
const python = process.env.PYTHON || 'python';

function poolHelper(...args: string[]): any {
  const out = execFileSync(python, [helper, ...args], { encoding: 'utf-8', stdio: ['ignore', 'pipe', 'inherit'] });
  return out.trim() ? JSON.parse(out) : null;
}

test.describe.configure({ mode: 'serial' });

test.describe('GPU panel', () => {
  let ids: string[] = [];

  test.afterAll(() => {
    if (ids.length) {
      poolHelper('cancel', ...ids); // leave the pool idle for the next run (teardown stops it anyway)
    }
  });

  test('shows no pool, then starts the embedded virtual pool and its GPU cards', async ({ page }) => {
    await page.sidebar.openTab(PANEL_ID);
    const panel = page.locator(`#${PANEL_ID}`);
    await expect(panel.locator('.jp-GpuPanel-noPool')).toBeVisible();
    await expect(panel.locator('.jp-GpuPanel-noPool')).toContainText('No GPU pool is running');
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: no pool');
    await panel.screenshot({ path: test.info().outputPath('panel-no-pool.png') });

    await panel.getByRole('button', { name: 'Start pool' }).click();
    const cards = panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card');
    await expect(cards).toHaveCount(2, { timeout: 90000 });
    await expect(panel.locator('.jp-GpuPanel-content')).toHaveAttribute('data-state', 'ok');
    for (const card of await cards.all()) {
      await expect(card.locator('.jp-GpuPanel-badge')).toHaveText('virtual');
      await expect(card.locator('.jp-GpuPanel-memText')).toContainText('of 16.0 GiB leased');
      await expect(card.locator('.jp-GpuPanel-empty')).toHaveText('idle');
    }
    await expect(panel.locator('.jp-GpuPanel-virtualNotice')).toContainText('virtual GPUs');
    await expect(panel.getByRole('button', { name: 'Scale' })).toBeVisible(); // the embedded pool is scalable
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: 0 of 2');
    // the pool's quotas: one row per team, mine (panel-tester's team "panel") first and highlighted
    const quotas = panel.locator('.jp-GpuPanel-quotas');
    await expect(quotas.locator('.jp-GpuPanel-quotaRow')).toHaveCount(2);
    await expect(quotas.locator('.jp-GpuPanel-quotaRow').first()).toHaveAttribute('data-team', 'panel');
    await expect(quotas.locator('[data-team="panel"]')).toHaveClass(/jp-mod-mine/);
    await expect(quotas.locator('[data-team="others"]')).not.toHaveClass(/jp-mod-mine/);
    await expect(quotas.locator('[data-team="panel"]')).toContainText('0 of 1 GPU guaranteed');
    await expect(quotas.locator('.jp-GpuPanel-myQuota')).toHaveText(
      'panel-tester (team panel): 0 GPU held · no limit of your own'
    );
    await expect(panel.locator('.jp-GpuPanel-noQuotas')).toHaveCount(0);
    // the websocket took over from REST polling
    await expect(panel.locator('.jp-GpuPanel-live')).toHaveClass(/jp-mod-live/, { timeout: 15000 });
    await panel.screenshot({ path: test.info().outputPath('panel-idle.png') });
  });

  test('shows leases split per GPU, the queue with reasons, and my sessions; cancels from the panel', async ({
    page
  }) => {
    const work = poolHelper('load');
    expect(work.mine.state).toBe('granted');
    expect(work.other.state).toBe('granted');
    expect(work.waiting_mine.state).toBe('queued');
    const myLease: string = work.mine.leases[0].id;
    const otherLease: string = work.other.leases[0].id;
    ids = [myLease, otherLease, work.waiting_other.id, work.waiting_mine.id];

    await page.sidebar.openTab(PANEL_ID);
    await page.sidebar.setWidth(360, 'left');
    const panel = page.locator(`#${PANEL_ID}`);
    const cards = panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card');
    await expect(cards).toHaveCount(2, { timeout: 30000 });

    // memory split by lease: my half of one GPU, someone else's whole other GPU
    const myRow = panel.locator(`.jp-GpuPanel-leases li[data-lease-id="${myLease}"]`);
    await expect(myRow).toContainText('panel-tester');
    await expect(myRow).toContainText('analysis.ipynb › train');
    await expect(myRow).toContainText('0.5');
    const myCard = cards.filter({ has: page.locator(`li[data-lease-id="${myLease}"]`) });
    await expect(myCard.locator('.jp-GpuPanel-memText')).toContainText('8.0 GiB of 16.0 GiB leased');
    await expect(myCard.locator('.jp-GpuPanel-memSegment.jp-mod-mine')).toHaveAttribute('style', /width: 50(\.0+)?%/);
    const otherCard = cards.filter({ has: page.locator(`li[data-lease-id="${otherLease}"]`) });
    await expect(otherCard.locator('.jp-GpuPanel-memText')).toContainText('16.0 GiB of 16.0 GiB leased');

    // the queue, in order, each with its reason; Cancel only on mine
    const queue = panel.locator('.jp-GpuPanel-queue');
    await expect(queue.locator('h3')).toHaveText('Queue (2)');
    const waitingMine = queue.locator(`li[data-request-id="${work.waiting_mine.id}"]`);
    await expect(queue.locator(`li[data-request-id="${work.waiting_other.id}"]`)).toContainText('someone-else');
    await expect(queue.locator(`li[data-request-id="${work.waiting_other.id}"] button`)).toHaveCount(0);
    await expect(queue.locator('.jp-GpuPanel-reason').first()).not.toBeEmpty();
    // fair share: I hold 0.5 GPU and someone-else a whole one, so my later request is served first
    await expect(queue.locator('li[data-request-id]').first()).toHaveAttribute('data-request-id', work.waiting_mine.id);

    // my sessions and the status bar
    const mine = panel.locator('.jp-GpuPanel-mine');
    await expect(mine.locator('h3')).toHaveText('My sessions (1)');
    await expect(mine.locator(`li[data-lease-id="${myLease}"]`)).toContainText('analysis.ipynb › train');
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText(/^GPU: 0\.5 of 2 · 1 queued \(#1\)$/);

    // quotas: each team within its guarantee, so nothing is preemptible yet
    const quotas = panel.locator('.jp-GpuPanel-quotas');
    await expect(quotas.locator('[data-team="panel"]')).toContainText('0.5 of 1 GPU guaranteed');
    await expect(quotas.locator('[data-team="others"]')).toContainText('1 of 1 GPU guaranteed');
    await expect(quotas.locator('.jp-GpuPanel-quotaHint')).toHaveCount(0);
    await expect(quotas.locator('.jp-GpuPanel-myQuota')).toContainText('0.5 GPU held');
    await expect(panel.locator('.jp-GpuPanel-preemptible')).toHaveCount(0);

    // right-sizing: my session reserves 8 GiB; once it reports a 600 MiB peak, the panel suggests 1 GiB
    const mySession = mine.locator(`li[data-lease-id="${myLease}"]`);
    await expect(mySession.locator('.jp-GpuPanel-usage')).toHaveText('8.0 GiB reserved');
    await expect(mySession.locator('.jp-GpuPanel-rightSize')).toHaveCount(0);
    // a real cell in my session holds 600 MiB; the session measures its peak (on a virtual GPU: the
    // process's host memory, so a little more) and reports it through its worker
    const peak: number = poolHelper('peak', work.mine.id, String(600 * MiB)).peak_bytes;
    expect(peak).toBeGreaterThanOrEqual(600 * MiB);
    expect(peak).toBeLessThan(700 * MiB);
    const shown = `${(peak / MiB).toFixed(1)} MiB`;
    await expect(mySession.locator('.jp-GpuPanel-usage')).toHaveText(`peak ${shown} of 8.0 GiB reserved`);
    await expect(mySession.locator('.jp-GpuPanel-rightSize')).toHaveText(
      `used ${shown} of 8.0 GiB: ask --memory 1GiB next time`
    );

    // (the README's picture, docs/images/panel.png, is tour.spec.ts's: real notebooks, not this test's work)
    await page.screenshot({ path: test.info().outputPath('panel.png') });

    // "go to cell": the session's notebook opens with the lease's cell (named by %%gpu --name) active
    await page.contents.uploadContent(
      JSON.stringify({
        cells: [
          { cell_type: 'code', id: 'setup', metadata: {}, execution_count: null, outputs: [], source: 'import numpy' },
          {
            cell_type: 'code',
            id: 'c-train',
            metadata: {},
            execution_count: null,
            outputs: [],
            source: '%%gpu --gpus 0.5 --name train\nmodel = fit()'
          }
        ],
        // the notebook of a running lease has run a kernel, so it names one (and Lab asks no kernel question)
        metadata: { kernelspec: { name: 'python3', display_name: 'Python 3', language: 'python' } },
        nbformat: 4,
        nbformat_minor: 5
      }),
      'text',
      'analysis.ipynb'
    );
    await mine.locator(`li[data-lease-id="${myLease}"] .jp-GpuPanel-goto`).click();
    await expect
      .poll(
        () =>
          page.evaluate(() => {
            const widget = (window as any).jupyterapp.shell.currentWidget;
            return widget?.context?.path + ':' + widget?.content?.activeCellIndex;
          }),
        { timeout: 30000 }
      )
      .toBe('analysis.ipynb:1');
    await page.sidebar.openTab(PANEL_ID);

    // Cancel my queued request, then my session, from the panel
    await waitingMine.getByRole('button', { name: 'Cancel' }).click();
    await expect(waitingMine).toHaveCount(0);
    await expect(queue.locator('h3')).toHaveText('Queue (1)');
    await mine.locator(`li[data-lease-id="${myLease}"]`).getByRole('button', { name: 'Cancel' }).click();
    // its session measured a peak (it ran a cell): Cancel asks before ending it and its variables
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText(`End GPU session ${myLease}?`);
    await dialog.getByRole('button', { name: 'End session' }).click();
    await expect(mine.locator('h3')).toHaveText('My sessions (0)', { timeout: 20000 });
    await expect(myRow).toHaveCount(0);
    // freeing my half empties that GPU, so the broker grants the waiting whole-GPU request: both GPUs full
    await expect(queue.locator('h3')).toHaveText('Queue (0)', { timeout: 30000 });
    await expect(panel.locator('.jp-GpuPanel-memText')).toHaveText(Array(2).fill(/16\.0 GiB of 16\.0 GiB leased/), {
      timeout: 30000
    });
    await expect(page.locator('.jp-GpuStatus-text')).toHaveText('GPU: 0 of 2');
    // someone-else's team now holds 2 GPUs on a 1 GPU guarantee: the second lease is borrowed, preemptible
    await expect(quotas.locator('[data-team="others"]')).toContainText('2 of 1 GPU guaranteed');
    await expect(quotas.locator('[data-team="others"] .jp-GpuPanel-quotaHint')).toHaveText(
      'over guarantee: preemptible'
    );
    await expect(quotas.locator('[data-team="panel"] .jp-GpuPanel-quotaHint')).toHaveCount(0);
    const borrowed = panel.locator('.jp-GpuPanel-leases li.jp-mod-preemptible');
    await expect(borrowed).toHaveCount(1);
    await expect(borrowed).toContainText('someone-else');
    await expect(borrowed.locator('.jp-GpuPanel-preemptible')).toHaveText('preemptible');
    await expect(panel.locator('.jp-GpuPanel-memSegment.jp-mod-preemptible')).toHaveCount(1);
    await panel.screenshot({ path: test.info().outputPath('panel-preemptible.png') });
  });

  test('scales the pool from the Scale dialog', async ({ page }) => {
    await page.sidebar.openTab(PANEL_ID);
    const panel = page.locator(`#${PANEL_ID}`);
    await panel.getByRole('button', { name: 'Scale' }).click();
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText('Scale the GPU pool');
    await dialog.locator('input[name="n"]').fill('3');
    await dialog.getByRole('button', { name: 'Scale' }).click();
    await expect(panel.locator('.jp-GpuPanel-gpus .jp-GpuPanel-card')).toHaveCount(3, { timeout: 90000 });
    await expect(panel.locator('.jp-GpuPanel-gpus h3')).toHaveText('GPUs (3)');
  });
});

// keep `galata` imported for its fixtures' types in editors
void galata;
