#!/usr/bin/env bash
# Install what the tests need and run all of them: lint, format and types, Python (unit,
# integration, server routes), the shipped notebooks as tests, the panel's TypeScript lint and unit
# tests (jest) and its browser tests (Galata/Playwright on Debian's Chromium). This is the README's
# test command.
#
# Every stage runs, whatever happened in the ones before (a failing test must not hide the browser
# tests); the end prints one line per stage and the script exits non-zero if any failed. Arguments go
# to both pytest stages (e.g. `bash scripts/test.sh -x -k quota`). Tests must leave tracked files as
# they found them: the last stage checks that (screenshots for the docs are written only on request,
# see CONTRIBUTING.md). JUPYTER_GPU_TEST_STAGES="pytest,jest" runs only the stages it names.
set -uo pipefail
cd "$(dirname "$0")/.."

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export JUPYTER_GPU_VIRTUAL_GPUS="${JUPYTER_GPU_VIRTUAL_GPUS:-2x16GiB}"

NAMES=()
RESULTS=()
FAILED=0

# JUPYTER_GPU_TEST_STAGES="pytest,jest" runs only the stages named (all of them by default)
ONLY=",${JUPYTER_GPU_TEST_STAGES:-},"

# stage NAME COMMAND...: run COMMAND, remember how it ended and how long it took
stage() {
  local name=$1
  shift
  if [ "$ONLY" != ",," ] && [[ "$ONLY" != *",${name},"* ]]; then
    return 0
  fi
  echo
  echo "==== ${name}: $*"
  local start=$SECONDS
  "$@"
  local rc=$?
  local took=$((SECONDS - start))
  NAMES+=("$name")
  if [ "$rc" -eq 0 ]; then
    RESULTS+=("passed   (${took} s)")
  else
    RESULTS+=("FAILED   (exit ${rc}, ${took} s)")
    FAILED=1
  fi
  return 0
}

tracked_state() {
  # the content of every tracked file that differs from HEAD: what a test run must not change
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git diff --binary HEAD -- . | sha256sum
  fi
}

install() {
  # torch first, pinned: an unpinned torch would pull several GB of CUDA packages on a CPU machine
  python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0 || return 1
  # the editable install also builds the panel (jlpm install + build) into jupyter_gpu/labext/static
  python -m pip install --quiet -e ".[test]" || return 1
  # tests/system/hub: JupyterHub's proxy comes from npm (JupyterHub itself is in the test extra)
  command -v configurable-http-proxy >/dev/null 2>&1 || npm install --global --quiet configurable-http-proxy@5
  # systemd-analyze checks the shipped service units (tests/pool/test_service_units.py)
  if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd) >/dev/null \
      || { echo "could not install systemd (apt-get install systemd)"; return 1; }
  fi
}

browser() {
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || { echo "could not install Debian's chromium (apt-get install chromium)"; return 1; }
  fi
  (cd ui-tests && jlpm install >/dev/null && jlpm playwright test)
}

unchanged() {
  local after
  after=$(tracked_state)
  if [ "$after" != "$BEFORE" ]; then
    echo "the test run changed tracked files (tests must write to ignored folders):"
    git status --short --untracked-files=no
    return 1
  fi
}

BEFORE=$(tracked_state)

stage "install" install
# lint, format and types ([tool.ruff] and [tool.mypy] in pyproject.toml; CONTRIBUTING.md, "Lint")
stage "ruff check" ruff check jupyter_gpu tests bench ui-tests/*.py
stage "ruff format" ruff format --check jupyter_gpu tests bench ui-tests/*.py
stage "mypy" mypy jupyter_gpu
# the 25 slowest tests, to keep CI under its 30 minutes
stage "pytest" python -m pytest --durations=25 "$@"
# the shipped notebooks, as notebook tests through the project's own pytest plugin
stage "notebooks" python -m pytest --nbgpu notebooks "$@"
stage "jlpm lint" jlpm lint:check
stage "jest" jlpm test
stage "browser" browser
stage "tracked files" unchanged

echo
echo "==== summary"
for i in "${!NAMES[@]}"; do
  printf '%-15s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
done
if [ "$FAILED" -ne 0 ]; then
  echo "some stages failed: their output is above, under ==== NAME"
  exit 1
fi
echo "all stages passed"
