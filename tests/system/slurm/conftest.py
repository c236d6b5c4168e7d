"""Fixtures of the Slurm tests: a real one-node Slurm (``slurm.py``), installed when missing;
stopped at the end with every job cancelled."""

from __future__ import annotations

import pytest

from tests.system.slurm.slurm import LocalSlurm, sweep_stale, unavailable


@pytest.fixture(scope="module")
def slurm():
    sweep_stale()
    why = unavailable()
    if why:
        pytest.skip(why)
    with LocalSlurm(cpus=2) as cluster:  # two jobs of one core run; a third waits (Resources)
        yield cluster
