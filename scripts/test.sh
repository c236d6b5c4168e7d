#!/usr/bin/env bash
# Install what the tests need and run all of them: Python (unit, integration, server routes, headless
# notebooks), the panel's TypeScript unit tests (jest) and its browser tests (Galata/Playwright on Debian's
# Chromium). This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export JUPYTER_GPU_VIRTUAL_GPUS="${JUPYTER_GPU_VIRTUAL_GPUS:-2x16GiB}"

# torch first, pinned: an unpinned torch would pull several GB of CUDA packages on a CPU machine
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
# the editable install also builds the panel (jlpm install + build) into jupyter_gpu/labext/static
python -m pip install --quiet -e ".[test]"
# tests/system/hub: JupyterHub's proxy comes from npm (JupyterHub itself is in the test extra)
command -v configurable-http-proxy >/dev/null 2>&1 || npm install --global --quiet configurable-http-proxy@5
# lint, format and types ([tool.ruff] and [tool.mypy] in pyproject.toml; CONTRIBUTING.md, "Lint")
ruff check jupyter_gpu tests bench ui-tests/*.py
ruff format --check jupyter_gpu tests bench ui-tests/*.py
mypy jupyter_gpu

python -m pytest "$@"
# the shipped notebooks, as notebook tests through the project's own pytest plugin
python -m pytest --nbgpu notebooks "$@"

jlpm lint:check
jlpm test
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
(cd ui-tests && jlpm install >/dev/null && jlpm playwright test)
