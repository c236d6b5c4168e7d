"""JupyterLab server for the panel's browser tests (started by Playwright's webServer; see
playwright.config.js).

It runs the real server extension and the built panel from this checkout without installing
anything: the built assets (``jlpm build`` at the repository root) are exposed through a temporary
labextensions folder, and ``jupyter_gpu.labext`` is enabled here, as jupyter-config/ does for an
installed wheel. The embedded pool that the tests start from the panel uses virtual GPUs and a
private runtime directory (both set by the Playwright config), so it never meets a developer's own
pool.
"""

import logging
import os
import tempfile
from pathlib import Path

from jupyterlab.galata import configure_jupyter_server

log = logging.getLogger("jupyter_gpu.ui_tests")

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file
configure_jupyter_server(c)

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "jupyter_gpu" / "labext" / "static"
if not (STATIC / "package.json").exists():
    raise SystemExit(
        f"the panel is not built: run `jlpm build` in {REPO} first ({STATIC} is missing)"
    )

# labextension folders are looked up by package name, so expose static/ as "jupyter-gpu"
_ext_root = Path(tempfile.mkdtemp(prefix="jupyter-gpu-labext-"))
(_ext_root / "jupyter-gpu").symlink_to(STATIC, target_is_directory=True)
galata_path = c.LabServerApp.extra_labextensions_path
c.LabServerApp.extra_labextensions_path = [str(_ext_root), galata_path]

c.ServerApp.allow_root = True  # CI and dev containers run as root
c.ServerApp.jpserver_extensions = {"jupyter_gpu.labext": True}
c.ServerApp.port = int(os.environ.get("JUPYTER_GPU_UI_TESTS_PORT", "8917"))
c.GpuPanelConfig.update_interval = 0.5
log.info("panel assets from %s, runtime dir %s", STATIC, os.environ.get("JUPYTER_RUNTIME_DIR"))
