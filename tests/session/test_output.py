"""A cell's text output against the Jupyter server's own limit: what a cell prints is shown up to
the budgets, and one note names the setting for the rest.

Bug fixed: printing 100 MB in a %%gpu cell sent 8 MiB at once; the Jupyter server, which stops
passing on a kernel's output above its ``iopub_data_rate_limit`` (1 MB/s over
``rate_limit_window``, 3 s), said so in a message of its own, so the cell showed two limit messages
naming two settings and none of its output.
"""

from __future__ import annotations

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

from jupyter_gpu.session.output import Relay

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _cell(relay: Relay, clock: Clock, chunks: list[tuple[float, str]]) -> list[tuple[float, dict]]:
    """Run one cell that prints ``chunks`` (at their times); what the relay passed on, timed."""
    got: list[tuple[float, dict]] = []
    relay.begin(lambda msg: got.append((clock.t, msg)))
    for t, text in chunks:
        clock.t = t
        relay.emit({"op": "stream", "name": "stdout", "text": text})
    relay.finish_cell()
    relay.end()
    return got


def _server_window() -> tuple[float, float]:
    """The Jupyter server's defaults: what it passes on of a kernel's output before it stops."""
    server = ZMQChannelsWebsocketConnection
    return server.iopub_data_rate_limit.default_value, server.rate_limit_window.default_value


def test_printing_100_mb_shows_output_and_one_note_naming_the_setting():
    clock = Clock()
    relay = Relay(limit=8 * MiB, rate=512 * 1024, clock=clock)
    line = "x" * 1023 + "\n"
    chunks = [(i * 0.016, line * 256) for i in range(400)]  # 100 MiB in 6.4 s, 256 KiB at a time
    got = _cell(relay, clock, chunks)
    shown = [(t, m["text"]) for t, m in got if m["name"] == "stdout"]
    notes = [m["text"] for _, m in got if m["name"] == "stderr"]
    assert sum(len(text) for _, text in shown) >= MiB  # its output is shown
    assert len(notes) == 1 and "jupyter-gpu.session.output-rate" in notes[0], notes
    assert "output-limit" not in notes[0] and "\n" not in notes[0].rstrip("\n")
    # never faster than the Jupyter server passes on: it would drop the rest and say so itself
    rate, window = _server_window()
    for start, _ in shown:
        sent = sum(len(text) for t, text in shown if start <= t < start + window)
        assert sent / window <= rate, (start, sent)


def test_steady_printing_under_the_rate_is_all_shown_and_the_total_cap_names_its_setting():
    clock = Clock()
    relay = Relay(limit=8 * MiB, rate=512 * 1024, clock=clock)
    steady = [(i * 1.0, "y" * 1000 + "\n") for i in range(100)]
    got = _cell(relay, clock, steady)
    assert all(m["name"] == "stdout" for _, m in got) and len(got) == 100
    # a long run that stays under the rate, past the cell's total
    clock = Clock()
    relay = Relay(limit=64 * 1024, rate=512 * 1024, clock=clock)
    got = _cell(relay, clock, [(i * 1.0, "z" * 10_000 + "\n") for i in range(20)])
    notes = [m["text"] for _, m in got if m["name"] == "stderr"]
    assert len(notes) == 1 and "printed more than 64.0 KiB" in notes[0], notes
    assert "jupyter-gpu.session.output-limit" in notes[0] and "output-rate" not in notes[0]
