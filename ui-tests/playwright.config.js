/**
 * Playwright configuration for the panel's browser tests.
 *
 * The browser is the system's Debian chromium (no Playwright browser download: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
 * at install time). JupyterLab is started by the webServer below with the real server extension; the pool is a
 * real embedded pool of two virtual 16 GiB GPUs, in a private runtime directory that global setup and teardown
 * clean: panel.spec.ts starts it from the panel's Start button, notebooks.spec.ts from a notebook kernel (the
 * kernels that the server starts inherit this environment, so they find the same pool). The pool's processes
 * inherit the server's environment, so DASK_JUPYTER_GPU__POOL_CONFIG gives the pool the quotas in pool-quotas.yaml.
 */
const os = require('os');
const path = require('path');
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const port = process.env.JUPYTER_GPU_UI_TESTS_PORT || '8917';
const runtimeDir = process.env.JUPYTER_GPU_UI_TESTS_RUNTIME || path.join(os.tmpdir(), 'jupyter-gpu-ui-tests-runtime');
const env = {
  JUPYTER_RUNTIME_DIR: runtimeDir,
  JUPYTER_GPU_VIRTUAL_GPUS: '2x16GiB',
  JUPYTER_GPU_USER: 'panel-tester',
  JUPYTER_GPU_SCHEDULER: '',
  JUPYTER_GPU_UI_TESTS_PORT: port,
  DASK_JUPYTER_GPU__POOL_CONFIG: path.join(__dirname, 'pool-quotas.yaml')
};
Object.assign(process.env, env); // for the helper processes the tests run

module.exports = {
  ...baseConfig,
  reporter: [['list'], ['html', { open: 'never', outputFolder: 'playwright-report' }]],
  outputDir: 'test-results',
  timeout: 240000,
  workers: 1,
  retries: 0,
  globalSetup: require.resolve('./tests/global-setup'),
  globalTeardown: require.resolve('./tests/global-teardown'),
  use: {
    ...baseConfig.use,
    appPath: '/lab',
    baseURL: `http://localhost:${port}`,
    viewport: { width: 1280, height: 820 },
    trace: 'retain-on-failure',
    video: 'off', // video needs Playwright's own ffmpeg download
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync']
    }
  },
  webServer: {
    command: 'jlpm start',
    url: `http://localhost:${port}/lab`,
    timeout: 120 * 1000,
    reuseExistingServer: false,
    env: { ...process.env, ...env }
  }
};
