"""The cluster manager a ``jupyter-gpu pool up`` owns: a Dask cluster class that starts GPU
workers elsewhere.

Configured in the scheduler's Dask config (``docs/administration.md``)::

    jupyter-gpu:
      cluster-manager:
        class: dask_jobqueue.SLURMCluster      # any Dask SpecCluster class (every dask-jobqueue cluster)
        options: {cores: 4, memory: 16GiB, walltime: "08:00:00", job_extra_directives: ["--gres=gpu:1"]}
        gpus-per-job: 1                        # GPU workers each job starts
        workers: 0                             # at start; or adaptive: {minimum: 0, maximum: 8}

Why the pool owns it rather than a user's Dask client: the broker decides when GPUs are needed (a
request waits) and which workers may go (none that holds a session or host-memory copy), and the
same cluster serves every user. The class is built with the pool's own scheduler
(``PoolScheduler`` with the broker preloaded, on the host and port ``pool up`` was given), so it
must be a ``distributed.SpecCluster``: it starts its scheduler in this process and its workers as
jobs. dask-jobqueue's clusters are: their jobs run ``jupyter-gpu worker`` (``worker_command``)
with dask-worker's arguments, so each job is our worker (a ``GpuNanny`` per GPU running
``PoolWorker`` with the GPU plugin preloaded), on the job's GPUs (``CUDA_VISIBLE_DEVICES`` from
the allocation) or ``virtual-gpus``. Each job is told where the pool key is
(``DASK_JUPYTER_GPU__POOL_KEY_FILE`` in its script): put it on storage the job nodes share.

A class whose scheduler runs elsewhere (dask-kubernetes' operator ``KubeCluster`` keeps it in a
pod) cannot be given the pool's scheduler, and is refused with that reason;
docs/administration.md shows how to run such a pool instead.
"""

from __future__ import annotations

import importlib
import logging
import math
import shlex
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jupyter_gpu.common import config, poolkey

if TYPE_CHECKING:
    from distributed.security import Security

log = logging.getLogger(__name__)

KEYS = frozenset(
    {
        "class",
        "options",
        "gpus-per-job",
        "virtual-gpus",
        "workers",
        "adaptive",
        "idle",
        "cooldown",
        "interval",
    }
)


class ClusterManagerError(ValueError):
    """``jupyter-gpu.cluster-manager`` is not usable; the message names the key and the fix."""


@dataclass(frozen=True)
class ManagerSettings:
    """``jupyter-gpu.cluster-manager``, checked."""

    cls: str
    options: dict = field(default_factory=dict)
    gpus_per_job: int = 1
    virtual_gpus: str | None = None
    workers: int = 0
    adaptive: tuple[int, int] | None = None
    idle: float = 60.0
    cooldown: float = 30.0
    interval: float = 2.0

    @property
    def is_jobqueue(self) -> bool:
        return self.cls.startswith("dask_jobqueue.")


def _seconds(value: Any, key: str) -> float:
    from dask.utils import parse_timedelta

    try:
        seconds = float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError):
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.{key} is {value!r}: give a duration (60s, 5m)"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.{key} must be a duration >= 0, not {value!r}"
        )
    return seconds


def _count(value: Any, key: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 100_000:
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.{key} must be a whole number from {low} to 100000, "
            f"not {value!r}"
        )
    return value


def load_settings(value: Any = None) -> ManagerSettings | None:
    """The configured cluster manager (None: the pool has none); raises ``ClusterManagerError``."""
    value = config.get("cluster-manager") if value is None else value
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClusterManagerError(
            "jupyter-gpu.cluster-manager must be a mapping with at least `class` "
            "(e.g. {class: dask_jobqueue.SLURMCluster, options: {...}})"
        )
    unknown = sorted(set(value) - KEYS)
    if unknown:
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager: unknown key(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(KEYS))}"
        )
    cls = value.get("class")
    if not isinstance(cls, str) or "." not in cls:
        raise ClusterManagerError(
            "jupyter-gpu.cluster-manager.class must name a class as module.Class "
            "(e.g. dask_jobqueue.SLURMCluster)"
        )
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise ClusterManagerError(
            "jupyter-gpu.cluster-manager.options must be a mapping of the class's arguments"
        )
    adaptive = value.get("adaptive")
    bounds = None
    if adaptive is not None:
        if not isinstance(adaptive, dict) or set(adaptive) != {"minimum", "maximum"}:
            raise ClusterManagerError(
                "jupyter-gpu.cluster-manager.adaptive must be {minimum: M, maximum: N}"
            )
        bounds = (
            _count(adaptive["minimum"], "adaptive.minimum"),
            _count(adaptive["maximum"], "adaptive.maximum"),
        )
        if bounds[0] > bounds[1]:
            raise ClusterManagerError(
                f"jupyter-gpu.cluster-manager.adaptive: minimum {bounds[0]} exceeds maximum "
                f"{bounds[1]}"
            )
    virtual = value.get("virtual-gpus")
    if virtual is not None:
        from jupyter_gpu.common.inventory import parse_virtual_spec

        try:
            parse_virtual_spec(str(virtual))
        except ValueError as exc:
            raise ClusterManagerError(f"jupyter-gpu.cluster-manager.virtual-gpus: {exc}") from None
    settings = ManagerSettings(
        cls=cls,
        options=dict(options),
        gpus_per_job=_count(value.get("gpus-per-job", 1), "gpus-per-job", 1),
        virtual_gpus=str(virtual) if virtual is not None else None,
        workers=_count(value.get("workers", 0), "workers"),
        adaptive=bounds,
        idle=_seconds(value.get("idle", "60s"), "idle"),
        cooldown=_seconds(value.get("cooldown", "30s"), "cooldown"),
        interval=max(0.2, _seconds(value.get("interval", "2s"), "interval")),
    )
    cluster_class(settings)  # importable, and a SpecCluster: said now, before the pool listens
    return settings


def cluster_class(settings: ManagerSettings) -> type:
    """The configured class, imported and checked to start its scheduler in this process."""
    from distributed import SpecCluster

    module, _, name = settings.cls.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        extra = " (pip install 'jupyter-gpu[slurm]')" if module.startswith("dask_jobqueue") else ""
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.class {settings.cls}: cannot import {module} "
            f"({exc}){extra}"
        ) from None
    except AttributeError:
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.class: {module} has no {name}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, SpecCluster)):
        raise ClusterManagerError(
            f"jupyter-gpu.cluster-manager.class {settings.cls} is not a distributed.SpecCluster: "
            "it runs its "
            "scheduler elsewhere, so `jupyter-gpu pool up` cannot give it the pool's scheduler "
            "(with the broker). "
            "Run the pool's scheduler inside that deployment instead (docs/administration.md, "
            "Kubernetes)"
        )
    return cls


def worker_arguments(settings: ManagerSettings) -> list[str]:
    """What each job adds to ``jupyter-gpu worker SCHEDULER --name NAME ...``."""
    args = []
    if settings.virtual_gpus:
        args += ["--virtual-gpus", settings.virtual_gpus]
    return args


def gpu_bytes(settings: ManagerSettings) -> int | None:
    """The size of one GPU a job brings, when the settings say (virtual GPUs)."""
    if not settings.virtual_gpus:
        return None
    from jupyter_gpu.common.inventory import parse_virtual_spec

    return max(g.total_bytes for g in parse_virtual_spec(settings.virtual_gpus))


def scheduler_options(host: str, port: int, protocol: str, security: Security) -> dict:
    """The pool's scheduler as the cluster class builds it: the broker preloaded, only where asked,
    and a comm inside this process for the cluster object itself (``PoolScheduler``,
    ``broker/gate.py``)."""
    return {
        "host": host,
        "port": port,
        "protocol": protocol,
        "security": security,
        "dashboard": False,
        "preload": ["jupyter_gpu.broker.plugin"],
        "in_process_listener": True,
    }


def build(
    settings: ManagerSettings, host: str, port: int, protocol: str, security: Security
) -> Any:
    """The cluster object (not started), with the pool's scheduler and our worker in its jobs."""
    from jupyter_gpu.pool.listeners import PoolScheduler

    cls = cluster_class(settings)
    sched = scheduler_options(host, port, protocol, security)
    options = dict(settings.options)
    if settings.is_jobqueue:
        address = f"{protocol}://{host}:{port}"
        key_file = poolkey.key_path(address)
        if not config.get("pool-key-file"):
            log.warning(
                "the jobs read the pool key from %s, this machine's runtime folder: on a cluster, "
                "set "
                "jupyter-gpu.pool-key-file to a 0600 file on storage the job nodes share",
                key_file,
            )
        # what the job reserves for the worker process itself; sessions are counted by the node, not
        # by Dask
        options.setdefault("cores", 1)
        options.setdefault("memory", "2GiB")
        # one `jupyter-gpu worker` per job: it starts a worker per GPU
        options.setdefault("processes", 1)
        options.setdefault("job_name", "jupyter-gpu")
        options.setdefault("python", sys.executable)
        options["worker_command"] = "jupyter_gpu.cli worker"
        options["worker_extra_args"] = [
            *options.get("worker_extra_args", []),
            *worker_arguments(settings),
        ]
        options["job_script_prologue"] = [
            *options.get("job_script_prologue", []),
            f"export DASK_JUPYTER_GPU__POOL_KEY_FILE={shlex.quote(key_file)}",
        ]
        if protocol == "tls":
            # jobqueue hands the worker role's files to `jupyter-gpu worker`
            options["security"] = security
        cluster = cls(
            asynchronous=True,
            name=options.pop("name", "jupyter-gpu"),
            scheduler_cls=PoolScheduler,
            scheduler_options=sched,
            **options,
        )
    else:
        cluster = cls(
            asynchronous=True, scheduler={"cls": PoolScheduler, "options": sched}, **options
        )
    # one job, several workers: name-gpu0, name-gpu1 ... (jupyter-gpu worker)
    if settings.gpus_per_job > 1:
        cluster.new_spec["group"] = [f"-gpu{i}" for i in range(settings.gpus_per_job)]
    return cluster
