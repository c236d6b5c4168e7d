"""Everything a cell shows, captured inside the session process and relayed to the kernel as
messages.

- ``stdout``/``stderr`` at file-descriptor level: fds 1 and 2 are pipes read by threads, so C libraries,
  subprocesses and ``os.write`` are captured as well as ``print``;
- ``display()``, rich reprs, ``clear_output`` and display updates through an IPython ``DisplayPublisher``;
- the last expression's value through IPython's ``DisplayHook``;
- matplotlib figures through the same inline backend ipykernel uses.

Messages go to whichever cell is running (``Relay.begin``); the I/O thread sends them on.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import threading
import time
from typing import Any, Callable

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher

from jupyter_gpu.common.protocol import ClearMsg, DisplayMsg, OutputMsg, StreamMsg

Emit = Callable[[OutputMsg], None]  # a running cell's output, to its kernel


class Relay:
    """Routes messages to the running cell's sink; drops them between cells.

    Text output is held to two budgets, so that printing in a loop shows what it can and says
    once, naming the setting, what it did not show:

    - per cell (``limit`` bytes, ``session.output-limit``): a loop that prints for minutes must not
      push tens of megabytes into the notebook (the browser and the saved notebook suffer, not the
      cell);
    - per second (``rate`` bytes, ``session.output-rate``, after a first ``BURST``): the Jupyter
      server stops passing a kernel's output on when it comes faster than its
      ``iopub_data_rate_limit`` (1 MB/s over 3 s by default), with a message of its own naming that
      setting, and then shows nothing: printing 100 MB showed two limit messages and no output.
      Kept under the server's rate, the cell's output is shown and only ours is said.

    Beyond either budget, stream text is dropped and counted; ``finish_cell`` says how much, once.
    """

    BURST = 1 << 20  # bytes a cell may print at once before the rate applies

    def __init__(
        self,
        limit: int | None = None,
        rate: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit: Emit | None = None
        self.streams: list[RelayStream] = []
        self.limit, self.rate, self.clock = limit, rate, clock
        self._lock = threading.Lock()
        self._sent = 0
        self._dropped_bytes = 0
        self._dropped_lines = 0
        self._tokens, self._refilled = float(self.BURST), clock()
        self._by_rate = False  # whether the rate (not the cell's total) dropped output

    def begin(self, emit: Emit) -> None:
        with self._lock:
            self._sent = self._dropped_bytes = self._dropped_lines = 0
            self._tokens, self._refilled, self._by_rate = float(self.BURST), self.clock(), False
        self._emit = emit

    def end(self) -> None:
        self._emit = None

    def _room(self) -> tuple[float, bool]:
        """Bytes the running cell may print now, and whether the rate is what limits it."""
        room = math.inf if self.limit is None else float(self.limit - self._sent)
        if self.rate is None:
            return room, False
        now = self.clock()
        self._tokens = min(self.BURST, self._tokens + max(0.0, now - self._refilled) * self.rate)
        self._refilled = now
        return max(0.0, min(room, self._tokens)), self._tokens < room

    def emit(self, msg: OutputMsg) -> None:
        sink = self._emit
        if sink is None:
            return
        if (self.limit is not None or self.rate is not None) and msg["op"] == "stream":
            text = msg["text"]
            with self._lock:
                room, by_rate = self._room()
                if len(text) > room:
                    cut = text.rfind("\n", 0, int(room)) + 1 or int(room)
                    self._dropped_bytes += len(text) - cut
                    self._dropped_lines += text.count("\n", cut)
                    self._by_rate = self._by_rate or by_rate
                    if cut <= 0:
                        return
                    text = text[:cut]
                    msg = stream_msg(msg["name"], text)
                self._sent += len(text)
                self._tokens -= len(text)
        sink(msg)

    def finish_cell(self) -> None:
        """After the cell's output is flushed: one note saying what a budget dropped (if
        anything), and the setting that makes room."""
        with self._lock:
            dropped, lines, by_rate = self._dropped_bytes, self._dropped_lines, self._by_rate
            self._dropped_bytes = self._dropped_lines = 0
        if not dropped or self._emit is None:
            return
        from jupyter_gpu.common.units import format_bytes

        if by_rate:
            why = (
                f"this cell printed faster than {format_bytes(self.rate)} a second after its first "
                f"{format_bytes(self.BURST)} (faster, the notebook server stops showing output). "
                "Write large output to a file, print less often, or raise "
                "jupyter-gpu.session.output-rate (and the Jupyter server's "
                "iopub_data_rate_limit with it)."
            )
        else:
            why = (
                f"this cell printed more than {format_bytes(self.limit)}. Write large output to a "
                "file, print less often, or raise jupyter-gpu.session.output-limit."
            )
        text = f"[jupyter-gpu] {lines} line(s) ({format_bytes(dropped)}) of output were dropped: {why}\n"
        self._emit({"op": "stream", "name": "stderr", "text": text})

    def flush_streams(self) -> None:
        for stream in self.streams:
            stream.flush()


class RelayStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` replacement that batches text into ``stream`` messages."""

    def __init__(self, relay: Relay, name: str, max_delay: float = 0.05, max_chars: int = 16384):
        super().__init__()
        self.relay, self.name = relay, name
        self.max_delay, self.max_chars = max_delay, max_chars
        self._buf: list[str] = []
        self._size = 0
        self._first = 0.0
        self._lock = threading.Lock()
        relay.streams.append(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1 if self.name == "stdout" else 2

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            if not self._buf:
                self._first = time.monotonic()
            self._buf.append(text)
            self._size += len(text)
            due = self._size >= self.max_chars or time.monotonic() - self._first >= self.max_delay
        if due:
            self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._buf:
                return
            text = "".join(self._buf)
            self._buf.clear()
            self._size = 0
        self.relay.emit(stream_msg(self.name, text))

    def due(self) -> bool:
        with self._lock:
            return bool(self._buf) and time.monotonic() - self._first >= self.max_delay


def stream_msg(name: str, text: str) -> StreamMsg:
    """Text written to stdout or stderr, as the kernel shows it in the cell."""
    return {"op": "stream", "name": "stderr" if name == "stderr" else "stdout", "text": text}


class FdCapture:
    """Redirects file descriptors 1 and 2 into pipes read by threads that relay what C code writes.

    ``sync()`` returns once everything written to the fds before the call has been relayed: it
    writes a marker behind the data and waits for the reader to reach it (pipes keep order).
    """

    _MARK = b"\x00jupyter-gpu-sync\x00"

    def __init__(self, relay: Relay):
        self.relay = relay
        self._events: dict[int, threading.Event] = {}
        self._pipes: dict[int, int] = {}
        # a reader holds back bytes (a partial character or marker)
        self._in_flight = {1: False, 2: False}
        self._locks = {1: threading.Lock(), 2: threading.Lock()}
        self._threads = []
        self._libc: ctypes.CDLL | None
        try:
            self._libc = ctypes.CDLL(None)
        except OSError:  # pragma: no cover
            self._libc = None
        for fd, name in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            self._pipes[fd] = read_end
            os.dup2(write_end, fd)
            os.close(write_end)
            self._events[fd] = threading.Event()
            thread = threading.Thread(
                target=self._pump,
                args=(read_end, fd, name),
                daemon=True,
                name=f"jupyter-gpu-fd{fd}",
            )
            thread.start()
            self._threads.append(thread)

    def _pump(self, read_end: int, fd: int, name: str) -> None:
        import select

        pending = b""
        while True:
            select.select([read_end], [], [])
            # read and relay under the lock: sync() then sees bytes either still in the pipe or
            # relayed
            with self._locks[fd]:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return
                data = pending + chunk
                pending = b""
                while True:
                    at = data.find(self._MARK)
                    if at < 0:
                        break
                    if at:
                        self._send(name, data[:at])
                    data = data[at + len(self._MARK) :]
                    self._events[fd].set()
                # keep a possible partial marker (or partial UTF-8 sequence) for the next read
                keep = _partial_suffix(data, self._MARK)
                if keep:
                    pending, data = data[-keep:], data[:-keep]
                if data:
                    self._send(name, data)
                self._in_flight[fd] = bool(pending)

    def _send(self, name: str, data: bytes) -> None:
        self.relay.emit(stream_msg(name, data.decode("utf-8", "replace")))

    def sync(self, timeout: float = 2.0) -> None:
        if self._libc is not None:
            try:
                self._libc.fflush(None)  # C stdio buffers first
            except Exception:  # pragma: no cover  # noqa: BLE001 - a libc without fflush: the pipes are still drained
                pass
        busy = []
        for fd in (1, 2):
            with self._locks[fd]:
                if self._in_flight[fd] or _pending_bytes(self._pipes[fd]):
                    busy.append(fd)
        for fd in busy:  # a pipe with nothing written since the last sync needs no round trip
            self._events[fd].clear()
            os.write(fd, self._MARK)
        for fd in busy:
            self._events[fd].wait(timeout)


def _pending_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    import fcntl
    import struct
    import termios

    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 1  # unknown: sync to be safe


def _partial_suffix(data: bytes, mark: bytes) -> int:
    """Length of the longest tail of ``data`` that could start the marker or a UTF-8 character."""
    for n in range(min(len(mark) - 1, len(data)), 0, -1):
        if mark.startswith(data[-n:]):
            return n
    # an incomplete UTF-8 sequence at the end: hold it back (at most 3 bytes)
    for n in range(1, min(4, len(data) + 1)):
        byte = data[-n]
        if byte & 0xC0 == 0xC0:  # a lead byte
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
            return n if n < need else 0
        if byte & 0xC0 != 0x80:
            return 0
    return 0


class RelayDisplayPublisher(DisplayPublisher):
    """``display()`` / ``update_display`` / ``clear_output`` inside a session, sent to the
    kernel."""

    relay: Relay | None = None

    def publish(
        self,
        data: dict,
        metadata: dict | None = None,
        source: str | None = None,
        *,
        transient: dict | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        assert self.relay is not None  # make_shell sets it first
        self.relay.flush_streams()
        shown: DisplayMsg = {
            "op": "display",
            "data": data,
            "metadata": metadata or {},
            "transient": transient or {},
            "update": bool(update),
        }
        self.relay.emit(shown)

    def clear_output(self, wait: bool = False) -> None:
        assert self.relay is not None  # make_shell sets it first
        self.relay.flush_streams()
        cleared: ClearMsg = {"op": "clear", "wait": bool(wait)}
        self.relay.emit(cleared)


class CapturingDisplayHook(DisplayHook):
    """Keeps the last expression's value and its rich representation instead of printing them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_value: Any = None
        self.last_bundle: dict | None = None

    def reset(self) -> None:
        self.last_value, self.last_bundle = None, None

    def write_output_prompt(self) -> None:
        pass

    def compute_format_data(self, result: Any) -> tuple[dict, dict]:
        self.last_value = result
        return super().compute_format_data(result)

    def write_format_data(self, format_dict: dict, md_dict: dict | None = None) -> None:
        self.last_bundle = {"data": format_dict, "metadata": md_dict or {}}

    def finish_displayhook(self) -> None:
        pass
