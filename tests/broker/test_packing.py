from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu.broker import packing
from jupyter_gpu.broker.model import GpuSlot
from jupyter_gpu.common.protocol import RequestSpec

GiB = 2**30


def pool(*sizes_per_worker):
    gpus = []
    for w, sizes in enumerate(sizes_per_worker):
        for i, size in enumerate(sizes):
            gpus.append(
                GpuSlot(worker=f"w{w}", index=i, uuid=f"u{w}{i}", name="g", total_bytes=size * GiB)
            )
    return gpus


def grant(gpus, spec):
    placement = packing.place(spec, gpus)
    if placement is None:
        return None
    by_id = {g.id: g for g in gpus}
    for _, allocs in placement:
        for a in allocs:
            by_id[a.gpu].leased_bytes += a.bytes
    return placement


def test_best_fit_packs_fractions_onto_the_fullest_gpu_that_fits():
    gpus = pool([16, 16])
    first = grant(gpus, RequestSpec(fraction=0.5))
    second = grant(gpus, RequestSpec(fraction=0.5))
    # both halves on one GPU, the other stays whole
    assert first[0][1][0].gpu == second[0][1][0].gpu
    assert grant(gpus, RequestSpec(gpus=1)) is not None


def test_fraction_is_of_the_gpu_it_lands_on():
    gpus = pool([80])
    assert grant(gpus, RequestSpec(fraction=0.25))[0][1][0].bytes == 20 * GiB


def test_gang_ranks_land_on_distinct_gpus_all_or_nothing():
    gpus = pool([16, 16], [16])
    placement = grant(gpus, RequestSpec(fraction=0.25, workers=3))
    assert len({a.gpu for _, allocs in placement for a in allocs}) == 3
    assert packing.place(RequestSpec(fraction=0.25, workers=4), gpus) is None


def test_whole_gpus_need_entirely_free_gpus_on_one_worker():
    gpus = pool([16, 16], [16])
    grant(gpus, RequestSpec(fraction=0.1))
    placement = packing.place(RequestSpec(gpus=2), gpus)
    assert placement is None or all(a.bytes == 16 * GiB for a in placement[0][1])
    assert packing.place(RequestSpec(gpus=1), gpus) is not None


def test_impossible_requests_are_refused_with_the_fix():
    gpus = pool([16, 16])
    assert "largest GPU in the pool has 16.0 GiB" in packing.never_fits(
        RequestSpec(memory=40 * GiB), gpus
    )
    assert "--workers 2 or fewer" in packing.never_fits(RequestSpec(fraction=0.5, workers=3), gpus)
    assert "no worker has more than 2" in packing.never_fits(RequestSpec(gpus=3), gpus)
    assert packing.never_fits(RequestSpec(memory=16 * GiB), gpus) is None
    # no GPU yet: wait, don't refuse
    assert packing.never_fits(RequestSpec(fraction=0.5), []) is None


def test_waiting_reason_names_the_gap():
    gpus = pool([16])
    grant(gpus, RequestSpec(fraction=0.75))
    reason = packing.why_waiting(RequestSpec(fraction=0.5), gpus)
    assert reason == "waiting: no GPU has 8.0 GiB free; largest gap 4.0 GiB"
    assert "no GPU worker has joined" in packing.why_waiting(RequestSpec(fraction=0.5), [])


specs = st.one_of(
    st.builds(RequestSpec, fraction=st.floats(min_value=0.01, max_value=1.0)),
    st.builds(RequestSpec, memory=st.integers(min_value=1, max_value=24 * GiB)),
    st.builds(RequestSpec, gpus=st.integers(min_value=1, max_value=2)),
    st.builds(
        RequestSpec, fraction=st.floats(min_value=0.05, max_value=1.0), workers=st.integers(1, 3)
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=40), st.lists(st.sampled_from([8, 16, 24]), min_size=1, max_size=4))
def test_no_gpu_is_ever_overcommitted(requests, sizes):
    gpus = pool(sizes[: len(sizes) // 2 + 1], sizes[len(sizes) // 2 + 1 :])
    for spec in requests:
        placement = grant(gpus, spec)
        if placement is None:
            continue
        ranks_gpus = [a.gpu for _, allocs in placement for a in allocs]
        # never two allocations of one request on one GPU
        assert len(ranks_gpus) == len(set(ranks_gpus))
        for worker, allocs in placement:
            assert all(a.gpu.startswith(worker) for a in allocs)
    for g in gpus:
        assert 0 <= g.leased_bytes <= g.total_bytes
