"""A ``--workers`` run's rendezvous store, open to the run's ranks only.

Why not torch's ``TCPStore``: it answers anyone who connects, ``list_keys()`` included, and the
ranks' address is reachable by every account of the machine (``127.0.0.1`` when all ranks are on
one). Another user could read where the ranks listen and post a rank of their own. Here rank 0
serves the store on the socket its session bound for the run (``server.free_port``), and a
connection is served only once it has proven, by a mutual HMAC-SHA256 challenge, that it knows the
run's secret (``store_key``: made by the kernel per attempt and sent to each rank over its
secret-checked comm). The secret never crosses the wire; a stranger who connects reads and writes
nothing, and a peer that is not rank 0 learns nothing from a rank's answer either.

The client is a ``torch.distributed.Store`` written in Python (torch calls it from C++ for gloo's
and NCCL's rendezvous), with the semantics of torch's own stores: ``get`` and ``wait`` block until
the keys are set or the store's timeout passes; ``add`` counts; ``compare_set`` as ``HashStore``.

Messages are msgpack lists (Dask's own dependency), each framed by a 4-byte length; no pickle.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

import msgpack  # type: ignore[import-untyped]  # no stubs; Dask's own dependency
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

NONCE = 32
# seconds a connection has to prove it knows the run's secret
HANDSHAKE_S = 5.0
# the largest message either side accepts (store values are addresses and counters)
MAX_MESSAGE = 16 * 2**20
# connections of ranks the server holds at once; more are closed at once
MAX_CONNECTIONS = 512
# connections still proving the secret; a new one beyond this closes the oldest (a flood is bounded
# and cannot keep the ranks out: they try again)
MAX_PENDING = 64
# seconds a rank waits for a reply beyond what the op itself may wait (rank 0's machine lost)
REPLY_GRACE_S = 30.0
_LENGTH = struct.Struct("!I")


class StoreRefused(RuntimeError):
    """The other side does not know the run's secret (or broke the protocol)."""


def _proof(secret: bytes, role: bytes, *nonces: bytes) -> bytes:
    return hmac.new(secret, role + b"".join(nonces), hashlib.sha256).digest()


# ---------------------------------------------------------------------------------- server
class _Table:
    """The store's keys, in the server's event loop. Every op runs under the one lock, so that a
    read and the write that follows it (``add``, ``compare_set``) are one step: two ranks adding
    at once both count."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed = asyncio.Condition()

    def _put(self, key: str, value: bytes) -> None:  # the lock held
        self.data[key] = value
        self.changed.notify_all()

    async def _until(self, keys: list[str], timeout: float) -> bool:  # the lock held
        try:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: all(k in self.data for k in keys)), timeout
            )
        except asyncio.TimeoutError:
            return False  # (the condition has the lock again)
        return True

    async def answer(self, op: str, args: list[Any]) -> Any:
        """One request's answer; the ops of torch's ``Store``."""
        async with self.changed:
            if op in ("get", "wait"):
                keys = [str(args[0])] if op == "get" else [str(k) for k in args[0]]
                if not await self._until(keys, float(args[1])):
                    return ["timeout", ", ".join(keys)]
                return ["ok", self.data[keys[0]]] if op == "get" else ["ok"]
            return self._apply(op, args)

    def _apply(self, op: str, args: list[Any]) -> Any:  # the lock held
        if op == "set":
            self._put(str(args[0]), bytes(args[1]))
            return None
        if op == "add":
            key, amount = str(args[0]), int(args[1])
            value = int(self.data.get(key, b"0")) + amount
            self._put(key, str(value).encode())
            return value
        if op == "compare_set":
            key, expected, desired = str(args[0]), bytes(args[1]), bytes(args[2])
            current = self.data.get(key)
            if (current is None and not expected) or current == expected:
                self._put(key, desired)
                return desired
            return expected if current is None else current
        if op == "check":
            return all(str(k) in self.data for k in args[0])
        if op == "delete_key":
            return self.data.pop(str(args[0]), None) is not None
        if op == "num_keys":
            return len(self.data)
        raise StoreRefused(f"unknown store op {op!r}")


async def _read(reader: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_MESSAGE:
        raise StoreRefused(f"a message of {length} bytes (at most {MAX_MESSAGE})")
    return msgpack.unpackb(await reader.readexactly(length), raw=False)


def _frame(message: Any) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


class StoreServer:
    """Rank 0's side: serves the store on ``listen`` (a bound, listening socket) in a thread of
    its own, to connections that prove they know ``secret``, until :meth:`close`."""

    def __init__(self, listen: socket.socket, secret: bytes, handshake_s: float = HANDSHAKE_S):
        self.secret, self.handshake_s = secret, handshake_s
        self.address = listen.getsockname()[:2]
        self.refused = 0  # connections that did not prove the secret
        self._table: _Table | None = None
        # connections still proving the secret (oldest first) and those that did
        self._pending: dict[asyncio.StreamWriter, None] = {}
        self._ranks: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._run, args=(listen,), name="rendezvous-store", daemon=True
        )
        self._thread.start()
        self._ready.wait(30)

    def _run(self, listen: socket.socket) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve(listen))
        self._loop.close()

    async def _serve(self, listen: socket.socket) -> None:
        self._table, self._stopped = _Table(), asyncio.Event()
        listen.setblocking(False)
        server = await asyncio.start_server(self._connection, sock=listen, limit=MAX_MESSAGE)
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
            for writer in [*self._pending, *self._ranks]:
                writer.close()  # their handlers end on the closed stream
            await server.wait_closed()
            await asyncio.sleep(0)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_nonce = os.urandom(NONCE)
        writer.write(server_nonce)
        await writer.drain()
        client_nonce = await reader.readexactly(NONCE)
        claimed = await reader.readexactly(hashlib.sha256().digest_size)
        expected = _proof(self.secret, b"client", server_nonce, client_nonce)
        if not hmac.compare_digest(claimed, expected):
            raise StoreRefused("the peer does not know the run's secret")
        writer.write(_proof(self.secret, b"server", client_nonce, server_nonce))
        await writer.drain()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: the challenge first (at most ``handshake_s``), then the ops of one rank
        until it lets go. Connections still proving themselves are at most ``MAX_PENDING``: a new
        one closes the oldest of them, so that strangers who connect and say nothing cannot keep
        the run's ranks out (a rank whose connection was closed so tries again)."""
        assert self._table is not None and self._stopped is not None
        if self._stopped.is_set() or len(self._ranks) >= MAX_CONNECTIONS:
            writer.close()
            return
        peer = writer.get_extra_info("peername")
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.close()
        self._pending[writer] = None
        try:
            try:
                await asyncio.wait_for(self._handshake(reader, writer), self.handshake_s)
            except (StoreRefused, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
                self._refuse(peer)
                return
            finally:
                self._pending.pop(writer, None)
            self._ranks.add(writer)
            while True:
                try:
                    request = await _read(reader)
                except asyncio.IncompleteReadError:
                    return  # the rank let go
                try:
                    op, args = str(request[0]), list(request[1:])
                    reply = ["ok", await self._table.answer(op, args)]
                except (StoreRefused, ValueError, TypeError, IndexError, KeyError) as exc:
                    reply = ["error", f"{type(exc).__name__}: {exc}"]
                writer.write(_frame(reply))
                await writer.drain()
        except asyncio.CancelledError:
            pass  # the store is closing
        except Exception as exc:  # noqa: BLE001 - one broken connection never stops the store
            log.debug("rendezvous store: connection from %s ended: %s", peer, exc)
        finally:
            self._ranks.discard(writer)
            writer.close()

    def _refuse(self, peer: object) -> None:
        self.refused += 1
        if self.refused in (1, 10, 100, 1000, 10000):  # a flood does not fill the log
            log.warning(
                "rendezvous store: refused a connection from %s that did not prove the run's "
                "secret (%d so far)",
                peer,
                self.refused,
            )

    def close(self) -> None:
        """Stop serving and close the socket (the run is over)."""
        if self._stopped is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)


# ---------------------------------------------------------------------------------- client
def _timeout_error(message: str) -> Exception:
    error = getattr(torch_dist, "DistStoreError", RuntimeError)
    return error(message)


class RunStore(torch_dist.Store):
    """A rank's side: a ``torch.distributed.Store`` over one authenticated connection to rank
    0's :class:`StoreServer`. Calls are one at a time (a lock): torch's rendezvous makes them
    in turn."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: datetime.timedelta):
        super().__init__()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock = self._reach(host, port, secret, timeout.total_seconds())

    @classmethod
    def _reach(cls, host: str, port: int, secret: bytes, timeout: float) -> socket.socket:
        """A proven connection to the store, trying again (with a growing pause) while it is
        refused or closed, for at most ``timeout`` seconds: rank 0's store may not serve yet, or
        strangers' connections may have pushed this one out (``MAX_PENDING``)."""
        deadline, pause = time.monotonic() + timeout, 0.05
        while True:
            try:
                return cls._connect(host, port, secret, max(1.0, deadline - time.monotonic()))
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    raise _timeout_error(
                        f"could not join this run's rendezvous store at {host}:{port} within "
                        f"{timeout:.0f} s ({type(exc).__name__}: {exc}): rank 0's session is gone, "
                        "or this rank is not of this attempt of the run"
                    ) from None
            time.sleep(pause)
            pause = min(1.0, pause * 2)

    @staticmethod
    def _connect(host: str, port: int, secret: bytes, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=min(timeout, 60.0))
        try:
            sock.settimeout(HANDSHAKE_S)
            server_nonce = _recv_exactly(sock, NONCE)
            client_nonce = os.urandom(NONCE)
            sock.sendall(client_nonce + _proof(secret, b"client", server_nonce, client_nonce))
            answer = _recv_exactly(sock, hashlib.sha256().digest_size)
            if not hmac.compare_digest(
                answer, _proof(secret, b"server", client_nonce, server_nonce)
            ):
                raise StoreRefused(f"{host}:{port} is not this run's rendezvous store")
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except BaseException:
            sock.close()
            raise

    def _call(self, op: str, *args: Any, waits: float = 0.0) -> Any:
        """One request and its reply. A reply that does not come within the store's timeout (and
        what the op itself may wait) means rank 0 is gone without closing the connection (its
        machine lost): the connection is closed and torch's error raised."""
        with self._lock:
            try:
                self._sock.settimeout(self._timeout.total_seconds() + waits + REPLY_GRACE_S)
                self._sock.sendall(_frame([op, *args]))
                (length,) = _LENGTH.unpack(_recv_exactly(self._sock, _LENGTH.size))
                if length > MAX_MESSAGE:
                    raise StoreRefused(f"a reply of {length} bytes (at most {MAX_MESSAGE})")
                status, value = msgpack.unpackb(_recv_exactly(self._sock, length), raw=False)
            except TimeoutError:
                self._sock.close()
                raise _timeout_error(f"rendezvous store: no answer to {op} in time") from None
        if status != "ok":
            raise RuntimeError(f"rendezvous store: {value}")
        return value

    def _seconds(self, timeout: datetime.timedelta | None) -> float:
        return (timeout or self._timeout).total_seconds()

    # ------------------------------------------------------------ torch.distributed.Store
    def set(self, key: str, value: bytes | str) -> None:
        self._call("set", key, _raw(value))

    def get(self, key: str) -> bytes:
        reply = self._call("get", key, self._seconds(None), waits=self._seconds(None))
        if reply[0] == "timeout":
            raise _timeout_error(
                f"rendezvous store: key {reply[1]!r} not set within {self._timeout}"
            )
        return bytes(reply[1])

    def add(self, key: str, amount: int) -> int:
        return int(self._call("add", key, int(amount)))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        return bytes(self._call("compare_set", key, _raw(expected), _raw(desired)))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        reply = self._call("wait", list(keys), self._seconds(timeout), waits=self._seconds(timeout))
        if reply[0] == "timeout":
            raise _timeout_error(f"rendezvous store: keys {reply[1]} not set in time")

    def check(self, keys: list[str]) -> bool:
        return bool(self._call("check", list(keys)))

    def delete_key(self, key: str) -> bool:
        return bool(self._call("delete_key", key))

    def num_keys(self) -> int:
        return int(self._call("num_keys"))

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout = timeout

    def close(self) -> None:
        self._sock.close()


def _raw(value: bytes | str) -> bytes:
    """A value as torch hands it (``str`` or bytes-like), as the bytes the store keeps."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("the rendezvous store closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
