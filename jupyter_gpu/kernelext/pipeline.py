"""The first step of every ``%%gpu`` cell, single-GPU or ``--workers``: from the cell's text to a
``CellJob``.

Both kinds of cell are named and labelled the same way, register their source for tracebacks,
serialize their inputs before anything waits (so that a bad input is refused at once) and send the
same payload (``--workers`` then adds each rank's part), so that they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError

from jupyter_gpu.common import config
from jupyter_gpu.common.codenames import code_names_kept
from jupyter_gpu.common.datacontract import cell_names, input_item
from jupyter_gpu.common.protocol import CellPayload
from jupyter_gpu.common.remote_value import RemoteObject
from jupyter_gpu.kernelext.connection import PoolConnection
from jupyter_gpu.kernelext.options import CellOptions
from jupyter_gpu.kernelext.rendering import register_cell_source
from jupyter_gpu.kernelext.runs import RunBook, RunPlan


@dataclass
class CellJob:
    """One ``%%gpu`` cell, ready to run: what it sends, what it wants back, and what it is
    called."""

    cell: str
    count: int  # In[n]
    cell_name: str  # the file name its traceback lines carry: <%%gpu cell In[n]>
    label: str  # --name, or In[n] and its first line: the queue, the panel, the badge
    run_id: str  # new for every run of the cell (a retry after a lost worker keeps it)
    plan: RunPlan  # the run's checkpoint folder, and the earlier run it resumes (--resume)
    inputs: dict  # name -> serialized value, for the session (rank 0 of a --workers run)
    remote_refs: dict[str, RemoteObject]  # inputs that already live in a GPU session
    outputs: list[str]  # the names to bring back
    payload: CellPayload  # the execute request, without the cwd (taken when it runs)


def cell_number(shell: Any) -> int:
    """The In[n] number of the running cell. IPython 9 counts the running cell before running it (so
    ``execution_count`` is already n + 1 inside it); IPython 8 counts it afterwards."""
    import IPython

    return shell.execution_count - (1 if IPython.version_info[0] >= 9 else 0)


def cell_label(count: int, cell: str) -> str:
    """``In[n]`` and the cell's first line of code: how the queue and the panel name a cell without
    --name."""
    first = next(
        (ln.strip() for ln in cell.splitlines() if ln.strip() and not ln.strip().startswith("#")),
        "",
    )
    return f"In[{count}] {first[:60]}"


def notebook_name() -> str | None:
    """The notebook this kernel serves (Jupyter Server sets JPY_SESSION_NAME for its kernels)."""
    return os.environ.get("JPY_SESSION_NAME")


def prepare_inputs(
    ns: dict, opts: CellOptions, cell: str
) -> tuple[dict, dict[str, RemoteObject], list[str]]:
    """Serialize the inputs now, so a bad one is refused before anything waits. Returns the
    serialized inputs, the inputs that are placeholders of remote objects, and the names to bring
    back."""
    from distributed.protocol import serialize
    from distributed.protocol.serialize import Serialized

    free, assigned = cell_names(cell)
    if opts.inputs is not None:
        missing = [n for n in opts.inputs if n not in ns]
        if missing:
            raise UsageError(
                f"%%gpu --in: no variable named {', '.join(map(repr, missing))} exists in this "
                "kernel. List variables that exist here (or leave --in out to send the ones the "
                "cell uses)."
            )
        names = opts.inputs
    else:
        names = [n for n in free if n in ns and not n.startswith("_")]
    inputs: dict[str, Any] = {}
    remote_refs: dict[str, RemoteObject] = {}
    for name in names:
        value = ns[name]
        if isinstance(value, RemoteObject):
            remote_refs[name] = value
            continue
        try:
            # code_names_kept: functions from earlier cells keep their file names, so a remote
            # traceback through them shows their lines (this kernel's linecache has every cell's
            # source)
            with (
                _quiet("distributed.protocol.pickle", "distributed.protocol.core"),
                code_names_kept(),
            ):
                header, frames = serialize(
                    input_item(value), serializers=("dask", "pickle"), on_error="raise"
                )
        except Exception as exc:  # noqa: BLE001 - pickling runs the object's own code: every failure is the user's error
            raise UsageError(
                f"%%gpu: the input {name!r} ({type(value).__module__}.{type(value).__qualname__}) "
                "cannot be "
                f"sent to the GPU session: it cannot be pickled ({type(exc).__name__}: {exc}). "
                "Create it "
                "inside the %%gpu cell instead, or leave it out by listing the names the cell "
                "needs with "
                f"--in (e.g. --in {','.join(n for n in names if n != name) or 'x'})."
            ) from None
        inputs[name] = Serialized(header, frames)
    outputs = opts.outputs if opts.outputs is not None else assigned
    return inputs, remote_refs, outputs


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Dask logs a failed pickle with its whole traceback before raising it: the user gets our
    one-paragraph error instead, so those loggers are silenced while an input is serialized."""
    saved = [(logging.getLogger(name), logging.getLogger(name).disabled) for name in loggers]
    for logger, _ in saved:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, was in saved:
            logger.disabled = was


def prepare_cell(
    shell: Any, conn: PoolConnection, opts: CellOptions, cell: str, runs: RunBook
) -> CellJob:
    """Name the cell, register its source (remote tracebacks show its lines), serialize its inputs
    and build the execute request that every session running it gets: a new run (``runs``), which
    resumes an earlier run's checkpoints only with ``--resume``."""
    count = cell_number(shell)
    cell_name = f"<%%gpu cell In[{count}]>"
    register_cell_source(cell_name, cell)
    label = opts.name or cell_label(count, cell)
    inputs, remote_refs, outputs = prepare_inputs(shell.user_ns, opts, cell)
    plan = runs.plan(conn.user, conn.kernel, opts.name, cell, opts.resume)
    payload: CellPayload = {
        "code": cell,
        "inputs": inputs,
        "outputs": outputs,
        "exact_outputs": opts.outputs is not None,
        "cell_name": cell_name,
        "label": label,
        "max_bytes": config.get_bytes("output-max-bytes"),
        "checkpoint_dir": plan.checkpoint_dir,
    }
    return CellJob(
        cell=cell,
        count=count,
        cell_name=cell_name,
        label=label,
        run_id=plan.run_id,
        plan=plan,
        inputs=inputs,
        remote_refs=remote_refs,
        outputs=outputs,
        payload=payload,
    )
