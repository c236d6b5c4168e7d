"""The server extension as a jupyter_server ``ExtensionApp``: routes in, poller and scheduler comm
out.

An ``ExtensionApp`` (rather than a bare load function) gets a ``stop_extension`` hook, so the shared
snapshot poller and the scheduler comm close with the server instead of leaking into the next server
of a test session or a restart.
"""

from __future__ import annotations

import logging

from jupyter_server.extension.application import ExtensionApp

from jupyter_gpu.labext.handlers import SETTINGS_KEY, handler_classes, route_pattern
from jupyter_gpu.labext.hub_activity import HubActivity
from jupyter_gpu.labext.pool_link import GpuPanelConfig, PoolLink

log = logging.getLogger(__name__)


class GpuPanelExtension(ExtensionApp):
    """Serves ``<base_url>/jupyter-gpu/api/...`` for the JupyterLab GPU panel."""

    name = "jupyter_gpu.labext"
    load_other_extensions = True
    classes = [GpuPanelConfig]

    def initialize_settings(self) -> None:
        self.panel_config = GpuPanelConfig(parent=self.serverapp)
        self.pool_link = PoolLink(self.panel_config)
        self.settings[SETTINGS_KEY] = self.pool_link
        # behind JupyterHub: GPU work of this server's kernels is activity (labext/hub_activity.py)
        server = self.serverapp
        assert server is not None  # linked to its server before its settings are made
        self.hub_activity = HubActivity(
            self.pool_link.call,
            lambda: server.kernel_manager.list_kernel_ids(),
            self.panel_config.hub_activity_interval,
        )

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        self.hub_activity.start()

    def initialize_handlers(self) -> None:
        # ExtensionApp prefixes patterns with the server's base_url itself: pass them without it.
        self.handlers.extend(
            (route_pattern("/", pattern), handler) for pattern, handler in handler_classes()
        )
        log.info(
            "jupyter-gpu panel routes: %s",
            ", ".join(route_pattern("/", p) for p, _ in handler_classes()),
        )

    async def stop_extension(self) -> None:
        activity = getattr(self, "hub_activity", None)
        if activity is not None:
            await activity.close()
        link = getattr(self, "pool_link", None)
        if link is not None:
            await link.close()
