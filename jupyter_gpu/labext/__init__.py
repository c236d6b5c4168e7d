"""JupyterLab side of jupyter-gpu: the server extension behind the GPU panel, and the panel's built
assets.

The panel (TypeScript, built into ``static/`` at wheel build time so users need no node) only talks
to this server extension; the extension talks to the pool's scheduler with Dask RPC. Keeping the
browser away from the scheduler means the pool needs no CORS or browser-facing auth, and the Jupyter
server's own login protects every route.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where ``jupyter labextension develop`` and the wheel find the prebuilt panel."""
    return [{"src": "static", "dest": "jupyter-gpu"}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Tell jupyter_server which app serves the panel's routes (enabled by jupyter-config/)."""
    from jupyter_gpu.labext.app import GpuPanelExtension

    return [{"module": "jupyter_gpu.labext", "app": GpuPanelExtension}]
