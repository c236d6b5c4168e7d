"""Functions a ``%%gpu`` cell calls to learn where it runs and to stream its progress.

They work in any process: inside a session they read what the session was assigned; in a plain
kernel they describe the local process (rank 0 of 1, ``cpu`` or ``cuda``), so code written for
``%%gpu`` cells also runs unchanged without them.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # `import jupyter_gpu` in a cell stays light: the cell API only
    from jupyter_gpu.common.protocol import MetricsMsg

# Filled in by the session process when it is assigned a lease (jupyter_gpu.session.server).
_state: dict[str, Any] = {
    "rank": None,
    "world_size": None,
    "device": None,
    "lease": None,
    "emit": None,  # Callable[[dict], None]: sends a message to the running cell's kernel
    # Callable[[], torch.device]: on a virtual GPU, the device whose tensors stay remote
    "device_factory": None,
    # Callable[[dict], None]: a report with a step, for the broker's queue estimates
    "progress": None,
    "checkpoint_dir": None,  # pool storage for checkpoint()/restore()
    # Callable[[dict], None]: a scale-out run's metrics, batched to the broker
    "run_sink": None,
    "attempt": 0,  # 0 for a first run, n for the n-th resume after a lost worker
    "run": None,
}


def rank() -> int:
    """This process's rank in a ``%%gpu --workers N`` run (0 in a single-GPU cell)."""
    value = _state["rank"]
    return int(value if value is not None else os.environ.get("RANK", 0))


def world_size() -> int:
    """How many ranks run this cell (1 in a single-GPU cell)."""
    value = _state["world_size"]
    return int(value if value is not None else os.environ.get("WORLD_SIZE", 1))


def device() -> Any:
    """The ``torch.device`` this session should use: its pinned GPU, or ``cpu`` on a virtual GPU.

    On a virtual GPU, what a cell puts on this device stays in the session, as CUDA tensors do
    on a real GPU (``session/virtual_device.py``): a notebook behaves the same in CI and on a
    GPU."""
    import torch

    factory = _state.get("device_factory")
    # a virtual GPU: the session's marked device (session/virtual_device.py)
    if factory is not None:
        return factory()
    name = _state["device"]
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def report(step: int | None = None, **metrics: Any) -> None:
    """Stream metrics (``step=``, ``loss=``, ...) to the cell's progress display and the panel.

    With ``total=`` the cell shows a progress bar with the rate and the time left, and the
    pool's queue estimates when the GPU comes free from it. Steps may count from 0 or 1;
    reporting every n-th step is fine (the rate comes from the step numbers). Never blocks
    training: the message is queued and sent by the session's I/O thread.
    """
    emit: Callable[[MetricsMsg], None] | None = _state["emit"]
    values = {k: _plain(v) for k, v in metrics.items()}
    msg: MetricsMsg = {
        "op": "metrics",
        "rank": rank(),
        "step": step,
        "time": time.time(),
        "metrics": values,
    }
    if emit is not None:
        emit(msg)
    for sink in (_state["run_sink"], _state["progress"]):
        if sink is not None:
            sink(msg)


def _plain(value: Any) -> Any:
    """Tensors and NumPy scalars to Python numbers so that metrics cross msgpack cheaply."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except Exception:  # noqa: BLE001 - item() is the value's own code: its repr then
            return repr(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def checkpoint(state: Any, name: str = "checkpoint") -> str:
    """Persist ``state`` (e.g. model and optimizer ``state_dict``s and the step) to pool storage.

    Only rank 0 writes; the path is returned. ``restore()`` reads it back after a resume.
    """
    import torch

    directory = _checkpoint_dir()
    path = os.path.join(directory, f"{name}.pt")
    if rank() == 0:
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-save never leaves a torn checkpoint
    return path


def restore(default: Any = None, *, name: str = "checkpoint") -> Any:
    """The last ``checkpoint()`` of this run, or ``default`` if there is none yet::

        state = jupyter_gpu.restore({"step": -1})          # or restore(default={"step": -1})
        best = jupyter_gpu.restore(None, name="best")      # what checkpoint(x, name="best") saved

    As in ``checkpoint(state)``, the value comes first and the checkpoint's name is a keyword.
    ``restore("best")`` (a name where the default goes) is refused with a ``TypeError`` saying so
    when this run has a checkpoint of that name, rather than quietly returning ``"best"``.

    A new run of a cell has none: only a run that lost a worker (and reruns) or a cell run with
    ``%%gpu --resume`` finds checkpoints, and it says so in the cell.

    In a ``--workers`` run every rank must call it: rank 0 reads the checkpoint and broadcasts
    it, so that all ranks resume from the same step even if rank 0 checkpoints again before a
    slower rank gets here.
    """
    import torch

    if not isinstance(name, str) or not name:
        raise TypeError(
            f"jupyter_gpu.restore(name={name!r}): a checkpoint's name is a non-empty string, as "
            "given to jupyter_gpu.checkpoint(state, name=...)."
        )
    distributed = (
        world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    )
    state, misuse = default, None
    if rank() == 0:
        directory = _checkpoint_dir()
        path = os.path.join(directory, f"{name}.pt")
        if (
            isinstance(default, str)
            and default != name
            and os.path.exists(os.path.join(directory, f"{default}.pt"))
        ):
            misuse = (
                f"jupyter_gpu.restore({default!r}): the first argument is what to return when "
                f"there is no checkpoint yet, not a checkpoint's name. To read the checkpoint "
                f"{default!r} this run saved, write jupyter_gpu.restore(name={default!r})."
            )
        elif os.path.exists(path):
            state = torch.load(path, map_location="cpu", weights_only=False)
            # a run finds checkpoints only when it resumes (a retry after a lost worker, or
            # --resume): say so
            step = state.get("step") if isinstance(state, dict) else None
            note = (
                f"resumed from step {step}"
                if step is not None
                else "resumed from the last checkpoint"
            )
            why = f"attempt {_state['attempt'] + 1}" if _state["attempt"] else "--resume"
            print(f"[jupyter-gpu] {note} ({why})", flush=True)
    if distributed:
        box = [(state, misuse)]
        torch.distributed.broadcast_object_list(box, src=0)
        state, misuse = box[0]
    if misuse is not None:
        raise TypeError(misuse)
    return state


def _checkpoint_dir() -> str:
    directory = _state["checkpoint_dir"] or os.environ.get("JUPYTER_GPU_CHECKPOINT_DIR")
    if not directory:
        import tempfile

        directory = os.path.join(tempfile.gettempdir(), "jupyter-gpu-checkpoints", "local")
    os.makedirs(directory, exist_ok=True)
    return directory
