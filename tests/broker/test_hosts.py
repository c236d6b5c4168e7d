"""Host memory and CPU cores in the ledger (broker/hosts.py): what a session books on its machine,
where it may go, and what it is told when a machine's memory or cores are what is short."""

from __future__ import annotations

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, host_need
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Request
from jupyter_gpu.broker.packing import never_fits
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


def pool(*machines: tuple[int, int | None, float | None]) -> Ledger:
    """A ledger with one worker per machine: (GPUs of 16 GiB, memory for sessions, cores)."""
    ledger = Ledger(FairSharePolicy())
    for m, (n, memory, cpus) in enumerate(machines):
        worker = f"w{m}"
        ledger.set_worker_gpus(
            worker,
            [
                GpuSlot(worker=worker, index=i, uuid=f"G{m}.{i}", name="g", total_bytes=16 * GiB)
                for i in range(n)
            ],
        )
        ledger.set_host(worker, memory=memory, cpus=cpus)
    return ledger


def request(rid: str, user: str = "alice", **spec) -> Request:
    return Request(id=rid, user=user, kernel=f"k-{user}", client=None, spec=RequestSpec(**spec))


def test_a_session_that_does_not_say_gets_its_machines_part_for_its_gpu_share():
    host = HostSlot(worker="w0", memory=256 * GiB, cpu_milli=32_000, gpu_count=4)
    quarter = [(4 * GiB, 16 * GiB)]
    assert host_need(RequestSpec(fraction=0.25), quarter, host, SessionDefaults()) == (
        16 * GiB,
        2_000,
    )
    asked = RequestSpec(fraction=0.25, host_memory=3 * GiB, cpus=0.5)
    assert host_need(asked, quarter, host, SessionDefaults()) == (3 * GiB, 500)
    fixed = SessionDefaults(host_memory_per_gpu=8 * GiB, cpus_per_gpu=4.0)
    assert host_need(RequestSpec(fraction=0.25), quarter, host, fixed) == (2 * GiB, 1_000)


def test_a_lease_goes_only_where_its_host_memory_and_cores_fit_and_books_them():
    ledger = pool((2, 8 * GiB, 8.0), (2, 64 * GiB, 2.0), (2, 64 * GiB, 8.0))
    ledger.submit(request("R1", fraction=0.25, host_memory=32 * GiB, cpus=4))
    [(req, [lease])] = ledger.schedule(None)
    assert lease.worker == "w2" and (lease.host_memory, lease.cpu_milli) == (32 * GiB, 4_000)
    assert ledger.hosts["w2"].leased_memory == 32 * GiB
    ledger.end(lease.id, "ended")
    assert ledger.hosts["w2"].leased_memory == 0 and ledger.hosts["w2"].leased_cpu_milli == 0
    ledger.check()


def test_the_waiting_reason_names_the_host_resource_that_is_short():
    ledger = pool((2, 48 * GiB, 16.0))
    ledger.submit(request("R1", fraction=0.25, host_memory=40 * GiB))
    assert len(ledger.schedule(None)) == 1
    ledger.submit(request("R2", "bob", fraction=0.25, host_memory=16 * GiB))
    assert ledger.schedule(None) == []
    reason = ledger.requests["R2"].reason
    assert "16.0 GiB of host memory free for sessions; largest 8.0 GiB" in reason, reason


def test_a_machine_that_reports_nothing_is_unbounded_as_before():
    ledger = pool((1, None, None))
    for n in range(4):
        ledger.submit(request(f"R{n}", f"u{n}", fraction=0.25, host_memory=1024 * GiB, cpus=500))
    assert len(ledger.schedule(None)) == 4
    ledger.check()


def test_never_fits_counts_only_machines_with_the_gpus_the_request_needs():
    """Bug fixed: a request for 2 whole GPUs and 8 GiB of host memory, on a pool of a 1-GPU machine
    that reports nothing and a 2-GPU machine with 4 GiB, was queued for ever (the 1-GPU machine's
    unbounded memory counted for it); it is refused at once, with the reason."""
    ledger = pool((1, None, None), (2, 4 * GiB, None))
    gpus = list(ledger.gpus.values())
    why = never_fits(RequestSpec(gpus=2, host_memory=8 * GiB), gpus, ledger.hosts)
    assert why is not None and "8.0 GiB of host memory" in why and "--host-memory 4.0GiB" in why
    assert never_fits(RequestSpec(gpus=1, host_memory=8 * GiB), gpus, ledger.hosts) is None
    # ranks add up on one machine: 3 ranks of 2 GiB fit in 4 GiB only twice, plus one elsewhere
    three = RequestSpec(workers=3, fraction=0.5, host_memory=2 * GiB)
    assert never_fits(three, gpus, ledger.hosts) is None
    four = RequestSpec(workers=3, fraction=0.5, host_memory=3 * GiB)
    assert "for only 2 of them" in (never_fits(four, gpus, ledger.hosts) or "")


def test_the_ledger_checks_each_request_shape_once_until_the_pool_changes():
    """A flood of requests of one shape costs one look at every GPU, not one per request; a worker
    that joins (or reports its machine) is seen by the next check."""
    ledger = pool((2, 4 * GiB, None))
    big = RequestSpec(fraction=0.5, host_memory=8 * GiB)
    assert "8.0 GiB of host memory" in (ledger.never_fits(big) or "")
    assert ledger.never_fits(big) is ledger.never_fits(big)
    looked: list[int] = []
    real = ledger.capacity
    ledger.capacity = lambda remember=120.0: looked.append(1) or real(remember)  # type: ignore[method-assign]
    for _ in range(100):
        assert ledger.never_fits(big)
    assert looked == []
    ledger.set_worker_gpus(
        "w9", [GpuSlot(worker="w9", index=0, uuid="G9", name="g", total_bytes=16 * GiB)]
    )
    assert ledger.never_fits(big) is None and looked == [1]
    ledger.set_host("w9", memory=2 * GiB)
    assert ledger.never_fits(big) and looked == [1, 1]


def test_a_default_share_books_at_least_the_floor_but_never_more_than_the_machine_leaves():
    """Bug fixed: a ``--memory 64MiB`` cell on a 16 GiB GPU booked 42 MiB of host memory by
    default, less than its Python process needs, and was stopped (``min-host-memory``)."""
    from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, host_need
    from jupyter_gpu.common.protocol import RequestSpec

    GiB, MiB = 2**30, 2**20
    floor = SessionDefaults(min_host_memory=GiB)
    host = HostSlot("w", memory=10 * GiB, cpu_milli=1000, gpu_count=2)
    tiny = [(160 * MiB, 16 * GiB)]  # 1 % of a GPU: 50 MiB of host memory in proportion
    assert host_need(RequestSpec(fraction=0.01), tiny, host, SessionDefaults())[0] == 50 * MiB
    assert host_need(RequestSpec(fraction=0.01), tiny, host, floor)[0] == GiB
    big = [(16 * GiB, 16 * GiB)]  # above the floor: the proportional share
    assert host_need(RequestSpec(gpus=1), big, host, floor)[0] == 5 * GiB
    asked = RequestSpec(fraction=0.01, host_memory=100 * MiB)  # what a cell asks for is kept
    assert host_need(asked, tiny, host, floor)[0] == 100 * MiB
    small = HostSlot("w", memory=512 * MiB, cpu_milli=1000, gpu_count=1)  # the floor must fit
    assert host_need(RequestSpec(fraction=0.01), tiny, small, floor)[0] == 512 * MiB
    unbounded = HostSlot("w")  # a machine that reports nothing: nothing booked, as before
    assert host_need(RequestSpec(fraction=0.01), tiny, unbounded, floor)[0] == 0
