"""A kernel of a server JupyterHub started reaches the pool with nothing set by hand: what the Hub
puts in its environment (its user, its token, and the pool's address from the spawner config that
``jupyter_gpu.hubservice.config`` writes) is all it needs, and its session runs as the Hub user's
own account."""

from __future__ import annotations

import json

import pytest

from tests.system.hub.conftest import ALICE, GROUP
from tests.system.hub.lab import ServerKernel

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def test_a_hub_kernel_runs_gpu_cells_as_its_hub_user_with_nothing_set_by_hand(hubpool):
    hub = hubpool.hub
    url = hub.start_server(ALICE)
    kernel = ServerKernel(url, hub.admin_token)
    try:
        env = kernel.run(
            "import os, json\nprint(json.dumps({k: bool(os.environ.get(k)) for k in ("
            "'JUPYTERHUB_USER', 'JUPYTERHUB_API_TOKEN', 'JUPYTERHUB_API_URL', "
            "'JUPYTER_GPU_SCHEDULER', 'JUPYTER_GPU_USER', 'JUPYTER_GPU_TOKEN')}))"
        )
        seen = json.loads(env.stdout)
        # what a Hub-started kernel really has: the Hub's user, token and API, and the pool's
        # address from the spawner; none of the pool's own user/token variables
        assert seen == {
            "JUPYTERHUB_USER": True,
            "JUPYTERHUB_API_TOKEN": True,
            "JUPYTERHUB_API_URL": True,
            "JUPYTER_GPU_SCHEDULER": True,
            "JUPYTER_GPU_USER": False,
            "JUPYTER_GPU_TOKEN": False,
        }, env
        out = kernel.run("%load_ext jupyter_gpu\n")
        assert out.error is None, out
        out = kernel.run(
            "%%gpu\nimport os, pwd\nprint('session of', pwd.getpwuid(os.getuid()).pw_name)"
        )
        assert out.error is None and f"session of {ALICE}" in out.stdout, out
        (lease,) = hubpool.leases_of(ALICE)
        # the Hub's name, and the team its Hub group gives (the quota file: team ml is GROUP)
        assert lease["user"] == ALICE and lease["team"] == "ml", (lease, GROUP)
    finally:
        kernel.close()
