import pytest

from jupyter_gpu.common import inventory
from jupyter_gpu.common.units import format_bytes, parse_size
from jupyter_gpu.errors import NoGpuAvailable


@pytest.mark.parametrize(
    "text,expected",
    [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5G", 1.5e9), ("1024", 1024), ("2 kib", 2048)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "GiB", "8 parsecs", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(16 * 2**30) == "16.0 GiB" and format_bytes(12) == "12 B"


def test_virtual_spec_forms():
    gpus = inventory.parse_virtual_spec("2x16GiB")
    assert [g.total_bytes for g in gpus] == [16 * 2**30] * 2
    assert all(g.virtual and g.name.startswith("Virtual GPU") for g in gpus)
    assert len({g.uuid for g in gpus}) == 2
    assert [g.total_bytes for g in inventory.parse_virtual_spec("16GiB,8GiB")] == [
        16 * 2**30,
        8 * 2**30,
    ]


@pytest.mark.parametrize("spec", ["2xfoo", "0x16GiB", ",", "lots"])
def test_bad_virtual_spec_names_the_variable_and_the_form(spec):
    with pytest.raises(ValueError) as info:
        inventory.parse_virtual_spec(spec)
    assert "JUPYTER_GPU_VIRTUAL_GPUS" in str(info.value) and "2x16GiB" in str(info.value)


def test_no_gpu_and_no_virtual_gpus_is_a_clear_message(monkeypatch):
    monkeypatch.delenv("JUPYTER_GPU_VIRTUAL_GPUS", raising=False)
    if inventory.nvml_gpus():
        pytest.skip("this machine has a real GPU")
    with pytest.raises(NoGpuAvailable) as info:
        inventory.discover()
    assert "JUPYTER_GPU_VIRTUAL_GPUS=2x16GiB" in str(info.value)


def test_cuda_visible_devices_selection_and_order():
    gpus = [
        inventory.GpuInfo(index=i, uuid=f"GPU-{i}", name="g", total_bytes=1, nvml_index=i)
        for i in range(3)
    ]
    chosen = inventory._apply_visible(gpus, ["2", "GPU-0"])
    assert [g.uuid for g in chosen] == ["GPU-2", "GPU-0"]
