"""Which run a ``%%gpu`` cell is: a new run id every time it runs, and the checkpoints it may
resume.

Why a new id per run: ``jupyter_gpu.checkpoint()`` writes to a folder named after the run, and
``jupyter_gpu.restore()`` reads from it. Were the id stable per cell, rerunning a cell with new
hyperparameters would silently start at the old run's last step. So only the run that lost a worker
(the retry loop in ``scaleout.py``, and a preempted batch cell in ``single_gpu_cells.py``, which rerun the
*same* job) finds its own checkpoints; a new run of a cell starts from scratch unless it says
``--resume``, which picks the latest earlier run of the same cell (same ``--name``, or same source)
and is always announced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass

from jupyter_gpu.common import config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """One run of a cell: its id, where its checkpoints go, and the earlier run it resumes (if
    any)."""

    cell_key: str
    run_id: str
    checkpoint_dir: str
    # the earlier run whose checkpoints this run starts from (--resume)
    resumes: str | None = None
    # what the badge says about resuming (also when there was nothing)
    resume_note: str | None = None


def cell_key(kernel: str, name: str | None, cell: str) -> str:
    """The same for every run of one cell (its ``--name``, else its source) in one kernel, different
    across kernels; a prefix of each run id."""
    base = name or hashlib.sha1(cell.encode()).hexdigest()[:10]
    return f"{_safe(base)}-{kernel[:8]}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:60]


def checkpoint_root(user: str) -> str:
    """Pool storage for this user's checkpoints (``jupyter-gpu.scaleout.checkpoint-dir``)."""
    return os.path.join(os.path.expanduser(config.get("scaleout.checkpoint-dir")), user)


class RunBook:
    """The runs of this kernel's cells: the latest run of each cell, for ``--resume`` and for
    tidying up the checkpoints of runs nobody can resume any more."""

    def __init__(self) -> None:
        # cell key -> the latest run id (its checkpoint folder's name)
        self.latest: dict[str, str] = {}
        self.folders: dict[str, str] = {}  # run id -> its checkpoint folder

    def plan(self, user: str, kernel: str, name: str | None, cell: str, resume: bool) -> RunPlan:
        """A new run of this cell; with ``resume``, continuing the latest earlier run's
        checkpoints."""
        key = cell_key(kernel, name, cell)
        run_id = f"{key}-{secrets.token_hex(3)}"
        root = checkpoint_root(user)
        if not resume:
            return RunPlan(key, run_id, os.path.join(root, run_id))
        earlier = self.latest.get(key)
        folder = self.folders.get(earlier or "")
        # not run in this kernel: the newest checkpoints of the same cell (a restarted kernel)
        if earlier is None:
            folder = _newest_checkpoints(
                root, _safe(name or hashlib.sha1(cell.encode()).hexdigest()[:10])
            )
            earlier = os.path.basename(folder) if folder else None
        if earlier is None or folder is None:
            return RunPlan(
                key,
                run_id,
                os.path.join(root, run_id),
                resume_note="--resume: no earlier run of this cell has checkpoints; starting from "
                "the beginning",
            )
        return RunPlan(
            key,
            run_id,
            folder,
            resumes=earlier,
            resume_note=f"--resume: continues run {earlier} from its last checkpoint",
        )

    def started(self, plan: RunPlan) -> None:
        """The run is under way: it is the one a later ``--resume`` of this cell continues."""
        self.latest[plan.cell_key] = os.path.basename(plan.checkpoint_dir)
        self.folders[os.path.basename(plan.checkpoint_dir)] = plan.checkpoint_dir

    def finished(self, plan: RunPlan, ok: bool) -> None:
        """A run that ended well makes the checkpoints of this cell's earlier runs in this kernel
        useless (``--resume`` continues the latest): remove them, so reruns do not fill the pool's
        storage."""
        if not ok:
            return
        keep = plan.checkpoint_dir
        for run_id, folder in list(self.folders.items()):
            if folder != keep and run_id.startswith(plan.cell_key + "-"):
                shutil.rmtree(folder, ignore_errors=True)
                del self.folders[run_id]


def _newest_checkpoints(root: str, prefix: str) -> str | None:
    """The most recently written checkpoint folder of runs named ``prefix-...`` under ``root``, if
    any."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir() and e.name.startswith(prefix + "-")]
    except OSError:
        return None
    with_files = []
    for entry in entries:
        try:
            files = [f for f in os.scandir(entry.path) if f.is_file() and f.name.endswith(".pt")]
        except OSError:
            continue
        if files:
            with_files.append((max(f.stat().st_mtime for f in files), entry.path))
    return max(with_files)[1] if with_files else None
