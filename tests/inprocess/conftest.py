"""In-process cluster tests: jupyter-gpu's Dask config defaults must exist before
``distributed.utils_test`` snapshots the config that ``gen_cluster`` resets to before every test."""

import jupyter_gpu.common.config  # noqa: F401  (registers the jupyter-gpu defaults)
