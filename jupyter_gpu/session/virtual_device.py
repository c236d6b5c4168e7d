"""On a virtual GPU, what a cell puts on ``jupyter_gpu.device()`` is marked, so it stays in the
session.

Why: on a real GPU, tensors and modules on ``device()`` are CUDA objects, which stay in the
session (the kernel gets a placeholder; ``--out`` and ``%gpu pull`` bring a CPU copy). On a
virtual GPU ``device()`` is the CPU, so the same tensors are plain CPU tensors and would come
back to the kernel: a notebook would then pass in CI and break on a GPU (``plt.plot(x,
y_pred.detach())`` gets a placeholder only there). So here the session marks them, as the GPU
would by their device:

- a tensor moved to, or made on, the very ``torch.device`` object that ``device()`` returned is marked
  (``x.to(dev)``, ``torch.zeros(3, device=dev)``), and so is a module moved there (``model.to(dev)``) with
  its parameters and buffers;
- what an operation computes from a marked tensor is marked (``y_pred = model(x)``), as a CUDA result is;
- a move off the device (``.cpu()``, ``.to("cpu")``) gives an unmarked tensor, as ``.cpu()`` of a CUDA
  tensor gives a CPU one.

The marks propagate through a ``TorchFunctionMode`` entered while a cell runs (only on virtual
GPUs; a few microseconds per torch call). The data contract reads them
(``common/datacontract.py``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from jupyter_gpu.common.datacontract import DEVICE_MARK, is_marked, unmark

log = logging.getLogger(__name__)

_MISSING = object()


class VirtualDevice:
    """The session's ``device()`` on a virtual GPU, and the marks that make it behave like a
    GPU's."""

    def __init__(self) -> None:
        import torch

        # the one object device() hands out: marks go by identity
        self.device = torch.device("cpu")
        self.mode: Any = None
        self._mode_class = _marking_mode_class(self)
        _patch_module_moves(self)

    def begin_cell(self) -> None:
        """Mark from here (the cell starts)."""
        if self.mode is None:
            self.mode = self._mode_class()
            self.mode.__enter__()

    def end_cell(self) -> None:
        """Stop marking (the cell ended: collecting its outputs must not mark or unmark
        anything)."""
        mode, self.mode = self.mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception as exc:  # noqa: BLE001 - a cell that left modes of its own unbalanced
                log.warning("could not leave the device-marking mode: %s", exc)

    def target(self, func: Any, args: tuple, kwargs: dict) -> bool | None:
        """Where a torch call puts its result: True (this device), False (elsewhere), None (not a
        move)."""
        import torch

        name = getattr(func, "__name__", "")
        if name in ("cpu", "numpy"):
            return False
        device = kwargs.get("device", _MISSING)
        if name == "to":
            for arg in args[1:]:
                if isinstance(arg, torch.Tensor):
                    return is_marked(arg)
                if isinstance(arg, (torch.device, str, int)):
                    device = arg
        if device is _MISSING or device is None:
            return None
        return device is self.device


def _marking_mode_class(vdev: VirtualDevice) -> type:
    from torch.overrides import TorchFunctionMode

    class DeviceMarks(TorchFunctionMode):
        """Marks the results of torch calls that put a tensor on the device, or compute from one
        there."""

        def __torch_function__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            target = vdev.target(func, args, kwargs)
            if target is True:
                return _mark(_own(out, args))
            if target is False:
                return _off_device(out, args)
            if _any_marked(args) or _any_marked(kwargs.values()):
                _mark(out)
            return out

    return DeviceMarks


def _own(out: Any, args: tuple) -> Any:
    """A tensor "moved" to the device that is the very tensor it came from (CPU to CPU: torch
    returns it as it is) would mark the original too; a GPU move makes a new tensor, and so does
    this (a view)."""
    import torch

    if isinstance(out, torch.Tensor) and args and out is args[0]:
        return out.view_as(out)
    return out


def _off_device(out: Any, args: tuple) -> Any:
    """``.cpu()`` of a marked tensor: unmarked, and not the marked tensor itself."""
    import torch

    if isinstance(out, torch.Tensor) and is_marked(out):
        out = out.view_as(out) if args and out is args[0] else out
        out.__dict__.pop(DEVICE_MARK, None)
    return out


def _any_marked(values: Any) -> bool:
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            if is_marked(value):
                return True
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            if any(is_marked(v) for v in value if isinstance(v, torch.Tensor)):
                return True
    return False


def _mark(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        try:
            setattr(out, DEVICE_MARK, True)
        except Exception:  # noqa: BLE001 - a tensor type without attributes: it comes back, as before
            pass
    elif isinstance(out, (list, tuple)):
        for item in out:
            _mark(item)
    return out


def _patch_module_moves(vdev: VirtualDevice) -> None:
    """``Module.to(dev)`` marks the module and its parameters and buffers (it moves them in place,
    which the marking mode cannot see); ``Module.to("cpu")`` and ``Module.cpu()`` unmark them."""
    import torch

    module = torch.nn.Module
    if getattr(module.to, "_jupyter_gpu", False):
        return
    original_to, original_cpu = module.to, module.cpu

    @functools.wraps(original_to)
    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        target = vdev.target(original_to, (self, *args), kwargs)
        with torch._C.DisableTorchFunction():
            out = original_to(self, *args, **kwargs)
        if target is True:
            _mark_module(self)
        elif target is False:
            unmark(self)
        return out

    @functools.wraps(original_cpu)
    def cpu(self: Any) -> Any:
        out = original_cpu(self)
        unmark(self)
        return out

    to._jupyter_gpu = True  # type: ignore[attr-defined]
    module.to, module.cpu = to, cpu


def _mark_module(module: Any) -> None:
    setattr(module, DEVICE_MARK, True)
    for tensor in [*module.parameters(), *module.buffers()]:
        _mark(tensor)
