"""Large buffers between processes of one machine (common/local_transfer.py): what is sent is what
is read, into the receiver's own memory, and a marker can name nothing but a pipe of a process."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from distributed.protocol import deserialize, serialize
from distributed.protocol.serialize import Serialized

from jupyter_gpu.common import local_transfer as lt

pytestmark = pytest.mark.skipif(not lt.available(), reason="no vmsplice or /proc on this system")


def test_a_large_array_round_trips_into_memory_of_the_receivers_own():
    data = np.arange(6 << 20, dtype=np.float32)  # 24 MiB: in parts, read in parallel
    sending = lt.Sending()
    marker = lt.pack(Serialized(*serialize(data, serializers=("dask", "pickle"))), sending)
    assert lt.is_marker(marker), "a 24 MiB array goes through pipes"
    json.dumps(marker, default=lambda b: b.decode("latin-1"))  # only names and sizes travel
    back = deserialize(*lt.unpack(marker))
    sending.wait(5)
    sending.close()
    assert np.array_equal(back, data) and back.flags.writeable
    back[0] = -1  # the receiver's copy is its own
    assert data[0] == 0


def _through_pipes(data: np.ndarray, buffers: lt.ReceiveBuffers) -> np.ndarray:
    sending = lt.Sending()
    marker = lt.pack(Serialized(*serialize(data, serializers=("dask", "pickle"))), sending)
    try:
        return deserialize(*lt.receive(marker, buffers=buffers))
    finally:
        sending.wait(5)
        sending.close()


def test_a_buffer_is_reused_only_once_nothing_refers_to_it_and_trim_gives_it_back():
    buffers = lt.ReceiveBuffers()
    first = _through_pipes(np.full(4 << 20, 1.0, dtype=np.float32), buffers)
    kept_view = first[10:20]  # a view of the first input, still alive
    del first
    second = _through_pipes(np.full(4 << 20, 2.0, dtype=np.float32), buffers)
    assert buffers.reused == 0, "a buffer a live view refers to is never written into"
    assert np.all(kept_view == 1.0) and np.all(second == 2.0)
    del kept_view  # now nothing refers to the first buffer: the next input of that size lands in it
    third = _through_pipes(np.full(4 << 20, 3.0, dtype=np.float32), buffers)
    assert buffers.reused == 1 and np.all(third == 3.0) and np.all(second == 2.0)
    third[0] = -1  # still the receiver's own copy: the sender's array is untouched
    # another size: fresh memory
    other = _through_pipes(np.full(2 << 20, 4.0, dtype=np.float32), buffers)
    assert buffers.reused == 1 and np.all(other == 4.0)
    del second, third, other
    assert buffers.unused_bytes() == (16 + 16 + 8) << 20
    # the next transfer keeps at most one unused buffer (max_free=1): the newest
    view = buffers.take(1 << 20)
    assert buffers.unused_bytes() == 8 << 20
    del view
    assert buffers.trim() == 9 << 20 and buffers.unused_bytes() == 0


def test_small_values_stay_on_the_comm():
    sending = lt.Sending()
    small = Serialized(*serialize(np.arange(10), serializers=("dask", "pickle")))
    assert lt.pack(small, sending) is small and sending.pipes == []


def test_frames_in_parts_and_inline_frames_read_back_in_order():
    data = np.random.default_rng(1).integers(0, 255, (3 * lt.PART) + 12345, dtype=np.uint8)
    sending = lt.Sending()
    marker = lt.send({"k": 1}, [data, b"small", memoryview(bytes(2 << 20))], sending)
    frames = marker[lt.MARK]["frames"]
    assert frames[1] == {"inline": b"small"} and len(frames[0]["parts"]) == min(
        lt._parallelism(), 3
    )
    header, back = lt.receive(marker)
    assert header == {"k": 1} and bytes(back[1]) == b"small" and bytes(back[2]) == bytes(2 << 20)
    assert np.array_equal(np.frombuffer(back[0], np.uint8), data)
    sending.close()


def _part_marker(parts, size):
    return {lt.MARK: {"header": {}, "frames": [{"parts": parts, "size": size}]}}


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/proc/1/fd/../../self/environ",
        "/proc/self/fd/0",
        "relative",
        "/proc/1/fd/1\n",
        7,
    ],
)
def test_a_marker_may_name_only_a_process_fd(path):
    with pytest.raises(lt.TransferError, match="may name only"):
        lt.receive(_part_marker([[path, 4096]], 4096))


def test_a_marker_naming_a_file_that_is_not_a_pipe_is_refused(tmp_path):
    with open(tmp_path / "data", "wb") as f:
        f.write(b"x" * 8192)
        f.flush()
        with pytest.raises(lt.TransferError, match="not a pipe"):
            lt.receive(_part_marker([[f"/proc/{os.getpid()}/fd/{f.fileno()}", 4096]], 4096))


def test_sizes_that_do_not_add_up_are_refused_and_a_short_pipe_is_an_error():
    sending = lt.Sending()
    marker = lt.send({}, [b"x" * (2 << 20)], sending)
    ((path, length),) = marker[lt.MARK]["frames"][0]["parts"]
    with pytest.raises(lt.TransferError, match="do not add up"):
        lt.receive(_part_marker([[path, length]], length + 1))
    sending.close()  # the sender went away: its pipe ends early
    sending = lt.Sending()
    marker = lt.send({}, [b"y" * (2 << 20)], sending)
    ((path, length),) = marker[lt.MARK]["frames"][0]["parts"]
    r, w = sending.pipes[0]
    sending._closed.set()
    for t in sending.threads:
        t.join(5)
    os.close(w)  # what has been sent so far, then the end of the pipe
    with pytest.raises(lt.TransferError, match="closed after"):
        lt.receive(_part_marker([[path, length]], length))
    os.close(r)


def test_a_malformed_marker_is_an_error_not_a_crash():
    for bad in (
        {lt.MARK: None},
        {lt.MARK: {"header": {}}},
        {lt.MARK: {"header": [], "frames": []}},
        {lt.MARK: {"header": {}, "frames": [{"parts": "x"}]}},
        _part_marker([["/proc/1/fd/1"]], 1),
        _part_marker([["/proc/1/fd/1", -5]], -5),
    ):
        with pytest.raises(lt.TransferError):
            lt.receive(bad)


def test_a_sender_whose_receiver_never_reads_gives_up_and_close_never_hangs(monkeypatch):
    monkeypatch.setattr(lt, "STALL", 0.3)
    sending = lt.Sending()
    # more than the pipe holds: the feeder waits for a reader
    lt.send({}, [b"z" * (8 << 20)], sending)
    t0 = time.monotonic()
    sending.wait(10)
    assert time.monotonic() - t0 < 5 and sending.errors and "read nothing" in sending.errors[0]
    sending.close()
    assert sending.pipes == []


def _check_in_another_process(marker: dict, *prefix: str) -> str:
    code = (
        "import sys, json; from jupyter_gpu.common import local_transfer as lt; "
        "print(lt.check_probe(json.loads(sys.argv[1])))"
    )
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code, json.dumps(marker, default=lambda b: b.decode())],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_probe_passes_for_another_process_of_this_account_and_fails_for_another_account():
    sending = lt.Sending()
    marker = lt.probe(sending)
    assert _check_in_another_process(marker) == "True"
    sending.close()
    if os.geteuid() == 0:  # another account cannot open this process's pipes
        sending = lt.Sending()
        marker = lt.probe(sending)
        assert (
            _check_in_another_process(
                marker, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"
            )
            == "False"
        )
        sending.close()
    assert not lt.check_probe(marker), "a closed probe is gone"
