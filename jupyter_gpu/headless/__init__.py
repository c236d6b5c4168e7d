"""Headless reruns of notebooks: ``jupyter-gpu run`` and the pytest plugin (notebooks as tests).

- :mod:`.runner`: execute a notebook with nbclient against a (private) pool, with parameters, per-cell and
  per-notebook timeouts, and a failure report that names the cell and shows the remote traceback.
- :mod:`.pool`: a private embedded pool for one run or one test session, and the lease checks that make
  sure a finished, timed-out or dead kernel holds nothing in the pool.
- :mod:`.kernel`: starting kernels wired to a pool, and the small client behind the ``gpu_kernel`` fixture.
- :mod:`.pytest_plugin`: ``pytest --nbgpu`` collects notebooks; fixtures ``gpu_pool`` and ``gpu_kernel``.
"""

from __future__ import annotations

__all__ = ["run_notebook"]


def run_notebook(*args, **kwargs) -> int:  # noqa: ANN002, ANN003 - forwards to the runner
    """See :func:`jupyter_gpu.headless.runner.run_notebook` (imported lazily: nbclient is not
    cheap)."""
    from jupyter_gpu.headless.runner import run_notebook as _run

    return _run(*args, **kwargs)
