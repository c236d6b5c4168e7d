#!/bin/bash
# Run tests/system/security (this tree's) against the code before issue 20 (f869d13), to see each
# test fail there for the right reason (the attack works), as docs/security.md records.
#
#   tests/system/security/run_on_old_code.sh /var/tmp/NAME-old PREFIX [pytest args...]
#
# Makes a git worktree of f869d13 at the given folder (unless it exists), copies this tree's tests/
# into it, and adds only harness plumbing, never a change to what the old code does: two alias
# modules under the names the harness imports (common/inventory.py, pool/launcher.py: the old
# modules' functions), and `give` (tests/support/service_account.py) made a no-op there, since the
# old services keep root and refuse secret files another account owns. Accounts are PREFIX<name>.
# Remove the worktree after: git worktree remove --force FOLDER
set -euo pipefail
here=$(cd "$(dirname "$0")/../../.." && pwd)
old=${1:?folder for the old checkout}; prefix=${2:?account prefix}; shift 2
[ -d "$old" ] || git -C "$here" worktree add --detach "$old" f869d13 >/dev/null
rm -rf "$old/tests" && cp -r "$here/tests" "$old/tests"
cp "$here/pyproject.toml" "$old/pyproject.new.toml"
printf 'from jupyter_gpu.worker.inventory import parse_virtual_spec  # noqa: F401\n' \
    > "$old/jupyter_gpu/common/inventory.py"
printf 'from jupyter_gpu.pool.embedded import ensure_embedded_pool, stop_embedded_pool  # noqa\n' \
    > "$old/jupyter_gpu/pool/launcher.py"
python - "$old/tests/support/service_account.py" <<'PY'
import sys
p = sys.argv[1]
t = open(p).read()
t = t.replace('    """Make ``paths`` (files, or folders and what is in them) the service account\'s."""\n',
              '    """(old code: its services keep root, and own the files)"""\n    return\n', 1)
open(p, "w").write(t)
PY
cd "$old"
export PYTHONPATH="$old" JUPYTER_GPU_VIRTUAL_GPUS=2x16GiB JUPYTER_GPU_TEST_ACCOUNTS="$prefix"
JUPYTER_RUNTIME_DIR=$(mktemp -d -p /var/tmp "$prefix-rt-XXXX")
export JUPYTER_RUNTIME_DIR
trap 'rm -rf "$JUPYTER_RUNTIME_DIR"' EXIT
python -m pytest -c pyproject.new.toml -p no:cacheprovider "$@"
