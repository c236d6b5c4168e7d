"""What Slurm says about the pool's jobs: ``squeue``'s state and reason, for the panel and the
queue.

Why its own module: dask-jobqueue submits and cancels jobs but never reads their state back, so a
job that waits in Slurm's queue (``PENDING (Resources)``) or that Slurm ended (``TIMEOUT``: its
walltime) is invisible to it. The pool shows the cluster manager's own words, and notices a job that
ended by itself so that it can be replaced.

One ``squeue`` call per poll for all of the pool's jobs, run without blocking the scheduler's event
loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

log = logging.getLogger(__name__)

# job states after which a job runs nothing any more (squeue --states=all keeps them for MinJobAge)
ENDED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


class SlurmStates:
    """Reads the state and reason of job ids with ``squeue`` (``kind`` names it in the snapshot)."""

    kind = "slurm"

    def __init__(self, squeue: str = "squeue", timeout: float = 10.0):
        self.squeue = shutil.which(squeue) or squeue
        self.timeout = timeout

    @staticmethod
    def ended(state: str | None) -> bool:
        return state in ENDED_STATES

    @staticmethod
    def describe(state: str, reason: str | None) -> str:
        """The state and reason of a job, for people (see :func:`describe`)."""
        return describe(state, reason)

    async def poll(self, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
        """``{job id: (state, reason)}`` for the ids Slurm still knows (ended ones too, for a
        while); raises ``RuntimeError`` when ``squeue`` fails (the caller keeps what it knew)."""
        if not job_ids:
            return {}
        cmd = [
            self.squeue,
            "--noheader",
            "--states=all",
            "--format=%i|%T|%r",
            f"--jobs={','.join(job_ids)}",
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ.copy(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"squeue did not answer within {self.timeout:g} s") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            if "Invalid job id" in text:  # every id is gone from Slurm's memory (MinJobAge passed)
                return {}
            raise RuntimeError(f"squeue failed ({proc.returncode}): {text}")
        return parse_squeue(out.decode(errors="replace"))


def parse_squeue(text: str) -> dict[str, tuple[str, str | None]]:
    """``squeue --format=%i|%T|%r`` lines into ``{job id: (state, reason)}``; a reason of ``None``
    (Slurm's word for no reason) is None."""
    states: dict[str, tuple[str, str | None]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        reason = parts[2].strip() if len(parts) > 2 else ""
        states[parts[0].strip()] = (
            parts[1].strip(),
            None if reason in ("", "None", "(null)") else reason,
        )
    return states


def describe(state: str, reason: str | None) -> str:
    """``PENDING (Resources)``, as ``squeue`` users read it."""
    return f"{state} ({reason})" if reason else state
