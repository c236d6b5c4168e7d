"""Host memory and CPU cores in the ledger (broker/hosts.py): what a session books on its machine,
where it may go, and what it is told when a machine's memory or cores are what is short."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu.broker.fair_share import FairSharePolicy
from jupyter_gpu.broker.hosts import HostSlot, SessionDefaults, host_need
from jupyter_gpu.broker.ledger import Ledger
from jupyter_gpu.broker.model import GpuSlot, Offload, Request
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


def parked_copy(ledger: Ledger, rid: str, user: str, nbytes: int, host_memory: int = GiB) -> str:
    """A lease of ``user`` granted, taken back and its variables (``nbytes``) saved on its
    machine, booked as the broker does when the session has written them."""
    ledger.submit(request(rid, user, fraction=0.25, host_memory=host_memory))
    [(_, [lease])] = ledger.schedule(None)
    ledger.end(lease.id, "suspended")
    result = {"path": "p", "saved": ["x"], "lost": [], "bytes": nbytes, "standby": False}
    lease.offload = Offload.saved_as(lease.worker, lease.id, result, 0.1)
    ledger.parking.park(lease)
    return lease.id


def test_parked_copies_are_booked_while_they_fit_and_the_oldest_spill_for_a_new_lease():
    ledger = pool((4, 16 * GiB, 8.0))
    host = ledger.hosts["w0"]
    old = parked_copy(ledger, "R1", "alice", 4 * GiB)
    new = parked_copy(ledger, "R2", "bob", 6 * GiB)
    assert list(host.parked) == [old, new] and host.parked_memory == 10 * GiB
    assert ledger.parking.bytes_by_user() == {"alice": 4 * GiB, "bob": 6 * GiB}
    assert ledger.parking.take_spills() == []
    ledger.check()
    # a lease of 8 GiB fits beside the 6 GiB copy only: the oldest copy (alice's) goes to disk
    ledger.submit(request("R3", "carol", fraction=0.25, host_memory=8 * GiB))
    [(_, [lease])] = ledger.schedule(None)
    assert [ls.id for ls in ledger.parking.take_spills()] == [old]
    assert ledger.ended[old].offload.spilled and list(host.parked) == [new]
    assert host.leased_memory + host.parked_memory == 14 * GiB <= host.memory
    ledger.check()
    # a copy restored (or discarded) leaves the machine's memory
    ledger.parking.unpark(ledger.ended[new])
    assert host.parked_memory == 0 and ledger.parking.bytes_by_user() == {}
    ledger.check()


def test_a_copy_that_cannot_fit_beside_the_leases_goes_to_disk_and_a_smaller_report_spills():
    ledger = pool((4, 16 * GiB, 8.0))
    ledger.submit(request("R0", "dave", fraction=0.25, host_memory=12 * GiB))
    assert len(ledger.schedule(None)) == 1
    big = parked_copy(ledger, "R1", "alice", 4 * GiB + 1)  # 12 GiB leased: 4 GiB left
    assert [ls.id for ls in ledger.parking.take_spills()] == [big] and not ledger.hosts["w0"].parked
    small = parked_copy(ledger, "R2", "bob", 2 * GiB)
    assert ledger.parking.take_spills() == [] and list(ledger.hosts["w0"].parked) == [small]
    ledger.set_host("w0", memory=13 * GiB, cpus=8.0)  # the admin leaves less to sessions
    assert [ls.id for ls in ledger.parking.take_spills()] == [small]
    ledger.check()


def test_copies_on_a_machine_that_reports_nothing_are_booked_and_never_spilled():
    ledger = pool((1, None, None))
    parked_copy(ledger, "R1", "alice", 64 * GiB)
    assert ledger.hosts["w0"].parked_memory == 64 * GiB and ledger.parking.take_spills() == []
    ledger.check()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["lease", "end", "park", "restore", "report"]),
            st.integers(0, 20),  # GiB: a lease's host memory, a copy's size, a report
        ),
        max_size=40,
    )
)
def test_leases_and_booked_copies_never_exceed_a_machines_memory_and_no_copy_is_lost(steps):
    """Whatever the order of grants, ends, copies saved, restored and smaller reports: leases and
    the copies booked on a machine never exceed what it leaves to sessions, and every saved copy
    is either booked there or spilled (told to its worker) exactly once."""
    ledger = pool((4, 16 * GiB, 8.0))
    host, live, saved, n = ledger.hosts["w0"], [], [], 0
    spilled: list[str] = []
    for op, size in steps:
        n += 1
        if op == "lease" and len(live) < 8:  # a quarter GPU stays free for the copies' sessions
            req = request(f"R{n}", f"u{n}", fraction=0.25, host_memory=size * GiB)
            ledger.submit(req)
            live += [ls.id for _, leases in ledger.schedule(None) for ls in leases]
            if req.state == "queued":  # no room now: it waits no further here
                ledger.finish_request(req, "cancelled", "no room")
        elif op == "end" and live:
            ledger.end(live.pop(0), "ended")
        elif op == "park":
            saved.append(parked_copy(ledger, f"R{n}", f"u{n}", size * GiB, host_memory=0))
        elif op == "restore" and saved:
            ledger.parking.unpark(ledger.ended[saved.pop(0)])
        elif op == "report":  # never below its leases: they keep what they hold (set_host)
            memory = max((16 + size) * GiB, host.leased_memory)
            ledger.set_host("w0", memory=memory, cpus=8.0)
        spilled += [ls.id for ls in ledger.parking.take_spills()]
        ledger.check()
        assert len(spilled) == len(set(spilled))
        for lease_id in saved:
            copy = ledger.ended[lease_id].offload
            assert (lease_id in host.parked) != (lease_id in spilled) == copy.spilled, lease_id


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


def test_in_a_small_pool_two_halves_share_one_gpu_when_machines_report_their_host():
    """Bug fixed: once workers reported host memory and cores, two ``--gpus 0.5`` sessions in a
    pool of two one-GPU workers went to both GPUs (each machine was one of "the last" able to host
    a half, so neither was filled), and a ``--gpus 1`` cell then waited for a GPU best fit leaves
    whole."""
    ledger = pool((1, 10 * GiB, 1.0), (1, 10 * GiB, 1.0))
    for rid, user in (("R1", "alice"), ("R2", "bob")):
        ledger.submit(request(rid, user, fraction=0.5))
    halves = [ls for _, leases in ledger.schedule(None) for ls in leases]
    assert [ls.worker for ls in halves] == ["w0", "w0"]
    ledger.submit(request("R3", "carol", gpus=1))
    [(_, [whole])] = ledger.schedule(None)
    assert whole.worker == "w1"
    ledger.check()


def test_copies_adopted_after_a_restart_are_booked_only_if_they_are_still_in_host_memory():
    """Before: a restarted broker booked every copy its workers reported, also those the old
    broker had spilled to disk (the worker did not say), so the machine's memory looked taken by
    copies that held none of it."""
    from jupyter_gpu.broker.adoption import Adoption
    from jupyter_gpu.broker.audit import AuditStore

    ledger = pool((4, 16 * GiB, None))

    def copy(lease_id: str, nbytes: int, **place) -> dict:
        view = {"id": lease_id, "user": "alice", "kernel": "k", "gpu_indices": [0], "bytes": GiB}
        result = {"path": "p", "saved": ["x"], "lost": [], "bytes": nbytes, "standby": False}
        return {**result, "lease": view, "client": None, **place}

    reported = [copy("L1", 4 * GiB), copy("L2", 8 * GiB, spilled=True), copy("L3", 2 * GiB)]
    refused = Adoption(ledger, AuditStore(None)).adopt("w0", [], reported)  # type: ignore[arg-type]
    assert refused == []
    host = ledger.hosts["w0"]
    assert host.parked == {"L1": 4 * GiB, "L3": 2 * GiB} and host.parked_memory == 6 * GiB
    assert ledger.ended["L2"].offload.spilled and not ledger.ended["L1"].offload.spilled
    ledger.parking.check()
