"""The cluster manager's pure parts: its settings (checked before the pool listens), the job script
a SLURMCluster submits (our worker, the pool key, virtual GPUs), squeue's output, worker names, and
the snapshot's host grouping and waiting reasons."""

from __future__ import annotations

import asyncio

import pytest
from distributed.security import Security

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import Request
from jupyter_gpu.broker.views import gpu_order, host_order, hosts_view, waiting_reason
from jupyter_gpu.common.inventory import parse_virtual_spec
from jupyter_gpu.common.protocol import RequestSpec
from jupyter_gpu.pool import cluster_manager as cm
from jupyter_gpu.pool.services import worker_names
from jupyter_gpu.pool.slurm import SlurmStates, describe, parse_squeue

SLURM = "dask_jobqueue.SLURMCluster"


@pytest.mark.parametrize(
    "value, words",
    [
        ("slurm", "must be a mapping"),
        ({"options": {}}, "must name a class"),
        ({"class": SLURM, "walltime": "1h"}, "unknown key(s) walltime"),
        ({"class": "no_such_module.Cluster"}, "cannot import no_such_module"),
        ({"class": "distributed.NoSuchCluster"}, "distributed has no NoSuchCluster"),
        ({"class": "distributed.deploy.cluster.Cluster"}, "is not a distributed.SpecCluster"),
        ({"class": SLURM, "options": ["cores", 1]}, "options must be a mapping"),
        ({"class": SLURM, "adaptive": {"minimum": 3, "maximum": 1}}, "minimum 3 exceeds maximum 1"),
        ({"class": SLURM, "adaptive": {"max": 3}}, "adaptive must be {minimum: M, maximum: N}"),
        ({"class": SLURM, "gpus-per-job": 0}, "gpus-per-job must be a whole number from 1"),
        ({"class": SLURM, "workers": 1.5}, "workers must be a whole number"),
        ({"class": SLURM, "idle": "soon"}, "idle is 'soon'"),
        ({"class": SLURM, "virtual-gpus": "lots"}, "virtual-gpus"),
    ],
)
def test_bad_settings_are_refused_with_the_key_and_the_fix(value, words):
    with pytest.raises(cm.ClusterManagerError, match=None) as exc:
        cm.load_settings(value)
    assert words in str(exc.value)


def test_settings_and_the_job_a_slurm_cluster_submits():
    settings = cm.load_settings(
        {
            "class": SLURM,
            "virtual-gpus": "1x4GiB",
            "adaptive": {"minimum": 0, "maximum": 4},
            "idle": "2m",
            "options": {"walltime": "01:00:00", "job_extra_directives": ["--gres=gpu:1"]},
        }
    )
    assert settings.adaptive == (0, 4) and settings.idle == 120 and settings.is_jobqueue
    assert cm.gpu_bytes(settings) == 4 * 2**30

    async def script() -> str:
        cluster = cm.build(settings, "10.0.0.5", 8786, "tcp", Security())
        return cluster.job_script()

    text = asyncio.run(script())
    assert (
        "#SBATCH -t 01:00:00" in text
        and "#SBATCH --gres=gpu:1" in text
        and "#SBATCH -J jupyter-gpu" in text
    )
    # our GPU worker
    assert "-m jupyter_gpu.cli worker tcp://" in text and "--virtual-gpus 1x4GiB" in text
    assert "export DASK_JUPYTER_GPU__POOL_KEY_FILE=" in text  # the pool key, where the jobs find it


def test_squeue_output_and_what_counts_as_ended():
    states = parse_squeue("123|PENDING|Resources\n124|RUNNING|None\n125|TIMEOUT|TimeLimit\n\n")
    assert states == {
        "123": ("PENDING", "Resources"),
        "124": ("RUNNING", None),
        "125": ("TIMEOUT", "TimeLimit"),
    }
    assert (
        describe(*states["123"]) == "PENDING (Resources)" and describe(*states["124"]) == "RUNNING"
    )
    assert (
        SlurmStates.ended("TIMEOUT")
        and SlurmStates.ended("CANCELLED")
        and not SlurmStates.ended("PENDING")
    )
    assert not SlurmStates.ended(None)


def test_a_jobs_gpu_workers_are_named_after_the_job():
    one, two = parse_virtual_spec("1x4GiB"), parse_virtual_spec("2x4GiB")
    assert worker_names(one, "jupyter-gpu-3") == ["jupyter-gpu-3"]
    assert worker_names(two, "jupyter-gpu-3") == ["jupyter-gpu-3-gpu0", "jupyter-gpu-3-gpu1"]
    assert worker_names(one, None)[0].startswith("Virtual GPU 0")


def test_hosts_are_listed_in_address_order_with_their_gpus():
    assert sorted(["10.0.0.10", "10.0.0.9", "node-b", "::1"], key=host_order) == [
        "10.0.0.9",
        "10.0.0.10",
        "::1",
        "node-b",
    ]
    gpus = [
        {
            "id": f"tcp://10.0.0.{h}:{p}#0",
            "worker": f"tcp://10.0.0.{h}:{p}",
            "host": f"10.0.0.{h}",
            "total_bytes": 4,
            "leased_bytes": lb,
        }
        for h, p, lb in ((9, 1, 1), (9, 2, 0), (10, 1, 2))
    ]
    # each worker's machine as it reports it (host 10.0.0.10's reports nothing: unbounded)
    ledger = Ledger(FairSharePolicy())
    ledger.set_host("tcp://10.0.0.9:1", memory=100, cpus=4)
    ledger.set_host("tcp://10.0.0.9:2", memory=50, cpus=2.5)
    ledger.hosts["tcp://10.0.0.9:2"].leased_memory = 20  # what its leases book
    ledger.set_host("tcp://10.0.0.10:1")
    unbounded = {"host_memory": None, "cpus": None}
    assert hosts_view(gpus, ledger) == [
        {
            "host": "10.0.0.9",
            "workers": 2,
            "gpus": [gpus[0]["id"], gpus[1]["id"]],
            "total_bytes": 8,
            "leased_bytes": 1,
            "host_memory": 150,
            "host_memory_leased": 20,
            "host_memory_parked": 0,
            "host_memory_spilled": 0,
            "cpus": 6.5,
            "cpus_leased": 0.0,
        },
        {
            "host": "10.0.0.10",
            "workers": 1,
            "gpus": [gpus[2]["id"]],
            "total_bytes": 4,
            "leased_bytes": 2,
            "host_memory_leased": 0,
            "host_memory_parked": 0,
            "host_memory_spilled": 0,
            "cpus_leased": 0.0,
            **unbounded,
        },
    ]


def test_gpus_of_a_host_are_listed_by_device_number_whatever_their_workers_ports():
    # one worker per GPU: the worker holding GPU 1 got the lower port (the CI tour saw "Virtual GPU
    # 1" first)
    gpus = [
        ("tls://127.0.0.1:41007", 0),
        ("tls://127.0.0.1:36045", 1),
        ("tls://127.0.0.1:9999", 2),
        ("tls://10.0.0.2:1", 0),
    ]
    assert sorted(gpus, key=lambda g: gpu_order(*g)) == [
        ("tls://10.0.0.2:1", 0),
        ("tls://127.0.0.1:41007", 0),
        ("tls://127.0.0.1:36045", 1),
        ("tls://127.0.0.1:9999", 2),
    ]


def test_a_waiting_request_hears_of_the_new_worker_unless_it_waits_for_its_quota():
    req = Request(id="R1", user="u", kernel="k", client=None, spec=RequestSpec(fraction=0.5))
    req.state, req.reason = "queued", "waiting: no GPU has 8.0 GiB free"
    note = "waiting for a new worker (job 12 pending), Slurm: PENDING (Resources)"
    assert waiting_reason(req, note) == f"waiting: no GPU has 8.0 GiB free; {note}"
    assert waiting_reason(req, None) == req.reason
    req.reason = "waiting: your quota full (1.0/1.0 GPU)"
    assert waiting_reason(req, note) == req.reason


def test_status_says_where_workers_come_from_and_which_host_each_gpu_is_on():
    from jupyter_gpu.kernelext.status_view import StatusView

    gpu = {
        "name": "Virtual GPU 0",
        "total_bytes": 4,
        "leased_bytes": 0,
        "leases": [],
        "virtual": True,
    }
    snap = {
        "time": 100.0,
        "queue": [],
        "quotas": {},
        "in_host_memory": [],
        "pool": {
            "workers": 2,
            "cluster": {
                "kind": "slurm",
                "manager": SLURM,
                "target": 3,
                "adaptive": None,
                "jobs": [
                    {
                        "name": "jupyter-gpu-2",
                        "job_id": "12",
                        "state": "PENDING",
                        "reason": "Resources",
                        "workers": 0,
                    },
                    {"name": "jupyter-gpu-0", "job_id": "10", "state": "RUNNING", "workers": 1},
                ],
                "ended": [
                    {
                        "name": "jupyter-gpu-1",
                        "job_id": "11",
                        "state": "TIMEOUT",
                        "reason": "TimeLimit",
                    }
                ],
            },
        },
        "gpus": [{**gpu, "host": "10.0.0.9"}, {**gpu, "host": "10.0.0.10"}],
    }
    text = StatusView(snap, "alice", "k", {}, None, "tcp://10.0.0.5:8786")._repr_mimebundle_()[
        "text/plain"
    ]
    assert (
        f"Workers come from Slurm ({SLURM}); 3 worker(s) asked for; on their way: job 12 PENDING "
        "(Resources); "
        "ended by themselves: job 11 TIMEOUT (TimeLimit)."
    ) in text
    assert "10.0.0.9: Virtual GPU 0" in text and "10.0.0.10: Virtual GPU 0" in text
