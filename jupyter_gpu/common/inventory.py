"""What GPUs this machine offers to the pool.

Why in ``common/``: a GPU worker offers these GPUs, the embedded pool starts one worker per GPU,
and a kernel that is about to start an embedded pool checks first that the machine has one (with
this module's message when it has none); none of them may import another's process code.

Real GPUs come from NVML (nvidia-ml-py), in the order and subset that ``CUDA_VISIBLE_DEVICES``
selects, with MIG slices listed in place of their parent when MIG is enabled. Machines without a GPU
can offer virtual GPUs (``JUPYTER_GPU_VIRTUAL_GPUS=2x16GiB``) so that the whole pool runs and is
tested anywhere; those are marked ``virtual`` everywhere they are shown and enforce nothing.
"""

from __future__ import annotations

import logging
import os
import re
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from jupyter_gpu.common import config as _config
from jupyter_gpu.common.protocol import VIRTUAL_ENV, GpuInfoMsg
from jupyter_gpu.common.units import format_bytes, parse_size
from jupyter_gpu.errors import NoGpuAvailable

log = logging.getLogger(__name__)


@dataclass
class GpuInfo:
    """One schedulable GPU (a whole device, a MIG slice, or a virtual GPU)."""

    index: int  # position on its worker, what a lease names
    # what CUDA_VISIBLE_DEVICES is pinned to (GPU-..., MIG-..., VGPU-...)
    uuid: str
    name: str
    total_bytes: int
    virtual: bool = False
    mig: bool = False
    parent_uuid: str | None = None
    nvml_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self) -> GpuInfoMsg:
        """As the worker sends it (``gpu_register_worker``, ``assign``)."""
        return cast(GpuInfoMsg, asdict(self))

    @property
    def best_isolation(self) -> str:
        """The strongest enforcement a session on this GPU can get (MPS is decided at session
        start)."""
        if self.virtual:
            return "none"
        return "mig" if self.mig else "torch-cap"


_VIRTUAL_SPEC = re.compile(r"^\s*(\d+)\s*[xX*]\s*(.+?)\s*$")


def parse_virtual_spec(spec: str) -> list[GpuInfo]:
    """``2x16GiB`` or ``16GiB,8GiB`` into virtual GPUs. Raises ValueError with the accepted
    forms."""
    sizes: list[int] = []
    try:
        for part in [p for p in spec.split(",") if p.strip()]:
            m = _VIRTUAL_SPEC.match(part)
            if m:
                count = int(m.group(1))
                if count < 1:
                    raise ValueError("count must be at least 1")
                sizes += [parse_size(m.group(2))] * count
            else:
                sizes.append(parse_size(part))
    except ValueError as exc:
        raise ValueError(
            f"{VIRTUAL_ENV}={spec!r} is not a virtual GPU list ({exc}). Write COUNTxSIZE such as "
            "2x16GiB, "
            "or sizes separated by commas such as 16GiB,8GiB."
        ) from None
    if not sizes:
        raise ValueError(f"{VIRTUAL_ENV}={spec!r} names no GPU; write e.g. 2x16GiB")
    host = os.uname().nodename
    return [
        GpuInfo(
            index=i,
            uuid=f"VGPU-{uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f'{host}-{i}-{size}')}",
            name=f"Virtual GPU {i} ({format_bytes(size)})",
            total_bytes=size,
            virtual=True,
        )
        for i, size in enumerate(sizes)
    ]


def _visible_selection() -> list[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def nvml_gpus() -> list[GpuInfo]:
    """Real GPUs via NVML, honouring CUDA_VISIBLE_DEVICES (indices or UUIDs) and MIG. Empty without
    NVML."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, driver not loaded, ...: no GPUs
        log.debug("NVML not available: %s", exc)
        return []
    try:
        devices: list[GpuInfo] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            name = _text(pynvml.nvmlDeviceGetName(handle))
            mig_children = _mig_devices(pynvml, handle, uuid, i)
            if mig_children:
                devices += mig_children
            else:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                devices.append(
                    GpuInfo(index=0, uuid=uuid, name=name, total_bytes=int(mem.total), nvml_index=i)
                )
        selection = _visible_selection()
        if selection is not None:
            devices = _apply_visible(devices, selection)
        for pos, gpu in enumerate(devices):
            gpu.index = pos
        return devices
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:  # pragma: no cover
            pass


def _mig_devices(pynvml: Any, handle: Any, parent_uuid: str, nvml_index: int) -> list[GpuInfo]:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # no MIG on this GPU or driver
        return []
    if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    out = []
    for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
        except pynvml.NVMLError:  # an empty MIG slot
            continue
        mem = pynvml.nvmlDeviceGetMemoryInfo(mig)
        out.append(
            GpuInfo(
                index=0,
                uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                name=f"{_text(pynvml.nvmlDeviceGetName(mig))} (MIG {j})",
                total_bytes=int(mem.total),
                mig=True,
                parent_uuid=parent_uuid,
                nvml_index=nvml_index,
            )
        )
    return out


def _apply_visible(devices: list[GpuInfo], selection: list[str]) -> list[GpuInfo]:
    """Keep the devices CUDA_VISIBLE_DEVICES names, in its order (indices refer to whole GPUs)."""
    whole: list[GpuInfo] = []
    for d in devices:
        if d.nvml_index is not None and all(w.nvml_index != d.nvml_index for w in whole):
            whole.append(d)
    chosen: list[GpuInfo] = []
    for item in selection:
        if item.isdigit():
            idx = int(item)
            chosen += [d for d in devices if d.nvml_index == idx]
        else:
            chosen += [
                d
                for d in devices
                if d.uuid == item or d.parent_uuid == item or d.uuid.startswith(item)
            ]
    return chosen


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(virtual_spec: str | None = None) -> list[GpuInfo]:
    """This machine's GPUs: real ones from NVML, else the virtual ones configured; else
    NoGpuAvailable.

        ``virtual_spec`` (or ``JUPYTER_GPU_VIRTUAL_GPUS``) forces virtual GPUs even where a GPU
        exists, which is what tests of the pool on a GPU machine want.
    """
    spec = virtual_spec or os.environ.get(VIRTUAL_ENV) or _config.get("embedded.virtual-gpus")
    if spec:
        return parse_virtual_spec(spec)
    real = nvml_gpus()
    if real:
        return real
    raise NoGpuAvailable(
        "This machine has no GPU that NVML can see (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
        "hides them all), "
        "and no virtual GPUs are configured. To try jupyter-gpu without a GPU, set "
        f"{VIRTUAL_ENV}=2x16GiB "
        "(two virtual 16 GiB GPUs) before starting the pool or the notebook; to use a GPU machine, "
        "run `jupyter-gpu worker ADDRESS` there and `%gpu connect ADDRESS` here."
    )
