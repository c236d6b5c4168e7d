"""The privileged launcher: the one process of a GPU machine that keeps root.

``jupyter-gpu worker`` started as root forks it first, before any thread exists and before Dask is
imported, and then drops its own process (nannies, Dask workers) to the pool's service account
(``pool/privileges.py``). The launcher listens on a Unix socket in a folder only root and the
service account's group may enter, and answers only processes of the service account (its uid, read
from the connection itself with ``SO_PEERCRED``). It imports no Dask.

What it does, per worker connection (``common/protocol.py``'s ``Launch*`` messages):

- ``start`` a session for a lease, only on a grant the broker signed (``common/grants.py``) for this
  worker, used once and before it expires; as the OS account of the grant's user (never root, never
  the service account); in a cgroup of its own with the host memory and CPU cores the grant
  books and a pids limit (``cgroups.py``); with a
  host-memory folder of its own (``hostfiles.py``); confined before it runs anything
  (``confine.py``): forked from the launcher's zygote (``zygote.py``), or a new interpreter;
- ``signal`` and ``end`` those sessions; move, open and create their copies in host memory for the
  worker, which never opens a user's file itself;
- tell the worker when one of them exits (its code, and whether its cgroup counted an OOM kill).

A connection can only name leases it started; when it closes, its sessions end and their folders
go. The launcher answers one message at a time (single-threaded: it may fork).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpu.common import grants, hostmem
from jupyter_gpu.common.protocol import LAUNCHER_REQUESTS, LauncherReply
from jupyter_gpu.common.safe_python import python_command
from jupyter_gpu.common.validation import BadMessage, check_fields
from jupyter_gpu.launcher.cgroups import Containment, SessionGroup, session_limits
from jupyter_gpu.launcher.confine import Account, Confinement, confine
from jupyter_gpu.launcher.hostfiles import HostFolders

log = logging.getLogger("jupyter_gpu.launcher")

SOCKET_ENV = "JUPYTER_GPU_LAUNCHER"  # where a worker process finds it
MAX_MESSAGE = 65536
DESCRIPTORS = 3


class Refusal(Exception):
    """The answer to a request is no; the message says why (the worker's log shows it)."""


@dataclass
class Settings:
    """What ``jupyter-gpu worker`` decided before it forked the launcher."""

    service_uid: int
    service_gid: int
    public_key: str  # the grant public key's file (root's)
    host_memory_limit: int | None
    pids_limit: int
    preload: list[str] = field(default_factory=list)
    fork_server: bool = True
    min_cpu_milli: int = 0  # session.min-cpus: cpu.max never below it (cgroups.session_limits)


@dataclass
class Session:
    lease: str
    uid: int
    gid: int
    folder: str  # under HostFolders.base
    group: SessionGroup | None
    pid: int = 0


@dataclass
class Connection:
    sock: socket.socket
    worker: str | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    parked: dict[str, Session] = field(default_factory=dict)  # ended, their copy kept


class Launcher:
    """See the module docstring."""

    def __init__(self, settings: Settings, listener: socket.socket) -> None:
        self.settings = settings
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.connections: dict[int, Connection] = {}
        self.nonces: dict[str, float] = {}  # grants used, until they expire
        Containment.sweep_stale()
        hostmem.sweep_stale()
        hostmem.sweep_stale(hostmem.spill_base())
        self.groups = Containment()
        self.folders = HostFolders()
        self.zygote = Zygote(settings.preload, self) if settings.fork_server else None
        self.stopping = False
        self.parent = os.getppid()  # the worker service: when it is gone, so are we

    # ------------------------------------------------------------------ the loop
    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        if self.zygote is not None:
            self.zygote.start()
        try:
            while not self.stopping and os.getppid() == self.parent:
                for key, _ in self.selector.select(timeout=0.2):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif self.zygote is not None and key.fileobj is self.zygote.sock:
                        self.zygote.read()
                    else:
                        self._read(self.connections[key.fd])
                self._reap()
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            if self.zygote is not None:
                self.zygote.stop()
            self.groups.close()
            self.folders.close()

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != self.settings.service_uid:
            log.warning(
                "refused a connection from pid %d (uid %d): not the service account", pid, uid
            )
            sock.close()
            return
        self.connections[sock.fileno()] = Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: Connection) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, MAX_MESSAGE, DESCRIPTORS)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._close(conn)
            return
        reply: LauncherReply = {"id": -1}
        handed: list[int] = []
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict) or msg.get("op") not in LAUNCHER_REQUESTS:
                raise Refusal("not a launcher request")
            reply["id"] = msg["id"] if isinstance(msg.get("id"), int) else -1
            check_fields(msg, LAUNCHER_REQUESTS[msg["op"]], msg["op"])
            if msg["op"] != "hello" and conn.worker is None:
                raise Refusal("say hello first")
            answer, handed = getattr(self, f"_{msg['op']}")(conn, msg, fds)
            reply.update(answer)
            fds = []  # taken by the request
        except (Refusal, BadMessage, grants.BadGrant, OSError, ValueError, KeyError) as exc:
            reply["error"] = str(exc) or type(exc).__name__
            log.warning("refused %s: %s", str(data[:80]), reply["error"])
        finally:
            for fd in fds:
                os.close(fd)
        self._send(conn, reply, handed)

    def _send(
        self, conn: Connection, message: Mapping[str, Any], fds: list[int] | None = None
    ) -> None:
        try:
            socket.send_fds(conn.sock, [json.dumps(message).encode()], fds or [])
        except OSError as exc:
            log.info("could not answer a worker (%s): it is gone", exc)
        finally:
            for fd in fds or []:
                os.close(fd)

    def _close(self, conn: Connection) -> None:
        """A worker connection closed: its sessions end, their folders go."""
        for session in list(conn.sessions.values()) + list(conn.parked.values()):
            self._end_session(session, keep_folder=False)
        conn.sessions.clear()
        conn.parked.clear()
        self.selector.unregister(conn.sock)
        self.connections.pop(conn.sock.fileno(), None)
        conn.sock.close()

    # ------------------------------------------------------------------ requests
    def _hello(self, conn: Connection, msg: dict[str, Any], fds: list[int]) -> tuple[dict, list]:
        if conn.worker is not None:
            raise Refusal("this connection has named its worker already")
        conn.worker = msg["worker"]
        return {}, []

    def _start(self, conn: Connection, msg: dict[str, Any], fds: list[int]) -> tuple[dict, list]:
        if len(fds) != DESCRIPTORS:
            raise Refusal(f"a start needs {DESCRIPTORS} descriptors")
        grant = self._checked_grant(conn, msg)
        if grant.get("as_user", True):
            account = account_of(grant["user"], self.settings.service_uid)
        else:  # a pool that does not isolate its users: the service account, confined all the same
            account = account_of_uid(self.settings.service_uid)
        # what the broker booked for this lease on this machine, from its signature: a worker
        # cannot raise it (a grant without the fields books nothing: only the admin's cap holds)
        limits = session_limits(
            _whole(grant.get("host_memory")),
            _whole(grant.get("cpu_milli")),
            self.settings.host_memory_limit,
            self.settings.pids_limit,
            self.settings.min_cpu_milli,
        )
        session = Session(
            lease=grant["lease"],
            uid=account["uid"],
            gid=account["gid"],
            folder=self.folders.make(grant["lease"], account["uid"], account["gid"]),
            group=self.groups.group(f"{grant['lease']}-{os.urandom(4).hex()}", limits),
        )
        spec: Confinement = {
            "account": account,
            "cgroup_procs": session.group.procs_files if session.group is not None else [],
            "folder": self.folders.path(session.folder),
            "nproc": self.settings.pids_limit,
            "env": dict(msg["env"]),
        }
        try:
            if self.zygote is not None:
                session.pid = self.zygote.fork(spec, msg, conn.worker or "", fds)
            else:
                session.pid = self._exec(spec, msg, conn.worker or "", fds)
        except BaseException:
            self._end_session(session, keep_folder=False)
            raise
        conn.sessions[session.lease] = session
        log.info("lease %s: session %d as %s", session.lease, session.pid, account["user"])
        return {
            "pid": session.pid,
            "folder": self.folders.path(session.folder),
            "containment": self.groups.kind if session.group is not None else "process group",
            "host_memory_limit": (session.group.memory_limit if session.group else None),
            "cpu_quota": (session.group.limits.get("cpu.max") if session.group else None),
            "pids_limit": (session.group.limits.get("pids.max") if session.group else None),
        }, []

    def _checked_grant(self, conn: Connection, msg: dict[str, Any]) -> grants.Grant:
        key = grants.load_public_key(self.settings.public_key)
        grant = grants.verify(msg["grant"], key)
        now = time.time()
        self.nonces = {n: t for n, t in self.nonces.items() if t > now}
        if grant["nonce"] in self.nonces:
            raise grants.BadGrant("this grant was used already")
        if grant["worker"] != conn.worker or grant["lease"] != msg["lease"]:
            raise grants.BadGrant("this grant is for another worker or lease")
        if any(grant["lease"] in c.sessions for c in self.connections.values()):
            raise Refusal(f"lease {grant['lease']} has a session already")
        self.nonces[grant["nonce"]] = grant["expires"]
        return grant

    def _exec(self, spec: Confinement, msg: dict[str, Any], worker: str, fds: list[int]) -> int:
        """A new interpreter for the session (no zygote): confined in the child, then exec."""
        # made here, as root: the folders on the path are checked before the child gives root up
        argv = python_command("jupyter_gpu.session", uid=0)
        pid = os.fork()
        if pid == 0:
            try:
                control, ready = confine(spec, fds)
                argv += [
                    *("--host", msg["host"], "--worker", worker),
                    *("--control-fd", str(control), "--ready-fd", str(ready)),
                    *("--preload", ",".join(self.settings.preload)),
                ]
                os.execve(argv[0], argv, dict(os.environ))
            except BaseException:  # noqa: BLE001 - said on the session's log pipe, which the worker reads
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        return pid

    def _signal(self, conn: Connection, msg: dict[str, Any], fds: list[int]) -> tuple[dict, list]:
        session = self._session(conn, msg["lease"])
        if msg["signal"] == "interrupt":
            _kill(session.pid, signal.SIGINT)
        else:
            self._kill(session)
        return {}, []

    def _end(self, conn: Connection, msg: dict[str, Any], fds: list[int]) -> tuple[dict, list]:
        session = conn.sessions.pop(msg["lease"], None)
        if session is None:
            return {}, []
        self._end_session(session, keep_folder=msg["keep_folder"])
        if msg["keep_folder"]:
            conn.parked[session.lease] = session
        return {}, []

    def _move_copy(
        self, conn: Connection, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict, list]:
        source, target = self._owned(conn, msg["lease"]), self._session(conn, msg["to_lease"])
        if source.uid != target.uid:
            raise Refusal("a copy moves only between two sessions of one user")
        path = self.folders.move(source.folder, target.folder, target.uid)
        return {"path": path}, []

    def _open_copy(
        self, conn: Connection, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict, list]:
        source = self._owned(conn, msg["lease"])
        return {}, [self.folders.open_for_reading(source.folder, source.uid)]

    def _create_copy(
        self, conn: Connection, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict, list]:
        target = self._session(conn, msg["lease"])
        fd, path = self.folders.create_for_writing(target.folder, target.uid, target.gid)
        return {"path": path}, [fd]

    def _spill_copy(
        self, conn: Connection, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict, list]:
        source = conn.parked.get(msg["lease"])
        if source is None:
            raise Refusal(f"no parked copy of lease {msg['lease']} was kept for this worker")
        return {"bytes": self.folders.spill(source.folder, source.uid)}, []

    def _forget_copy(
        self, conn: Connection, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict, list]:
        parked = conn.parked.pop(msg["lease"], None)
        if parked is not None:
            self.folders.remove(parked.folder)
        return {}, []

    # ------------------------------------------------------------------ sessions
    @staticmethod
    def _session(conn: Connection, lease: str) -> Session:
        session = conn.sessions.get(lease)
        if session is None:
            raise Refusal(f"no session of lease {lease} was started by this worker")
        return session

    def _owned(self, conn: Connection, lease: str) -> Session:
        """A live or parked session of this connection."""
        return conn.parked.get(lease) or self._session(conn, lease)

    @staticmethod
    def _kill(session: Session) -> None:
        if session.group is not None:
            session.group.kill()
        _kill(session.pid, signal.SIGKILL)

    def _end_session(self, session: Session, keep_folder: bool) -> None:
        self._kill(session)
        if session.group is not None:
            session.group.remove()
            session.group = None
        if not keep_folder:
            self.folders.remove(session.folder)

    def exited(self, pid: int, code: int) -> None:
        """A session ended (the zygote reaped it, or we did): tell its worker."""
        for conn in self.connections.values():
            for session in conn.sessions.values():
                if session.pid == pid:
                    use = session.group.memory_use() if session.group is not None else None
                    event = {"event": "exited", "lease": session.lease, "pid": pid, "code": code}
                    self._send(
                        conn,
                        {
                            **event,
                            "oom": bool(use and use.over_its_limit),
                            "peak": use.peak if use else None,
                            "limit": use.limit if use else None,
                        },
                    )
                    return

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if (
                self.zygote is not None
                and self.zygote.proc is not None
                and pid == self.zygote.proc.pid
            ):
                self.zygote.lost()
            else:
                self.exited(pid, os.waitstatus_to_exitcode(status))


def _whole(value: object) -> int:
    """A signed grant's count (bytes, thousandths of a core): 0 unless a whole number >= 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _kill(pid: int, sig: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def account_of(user: str, service_uid: int) -> Account:
    """The OS account named like the pool user: never root, never the service account."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Refusal(
            f"the pool user {user!r} has no account on {os.uname().nodename}, where the GPU is: "
            f"sessions run as their user. Ask the pool's admin to create it (e.g. `useradd "
            f"{user}`) on every GPU machine, or use the name of your account as your pool user."
        ) from None
    if entry.pw_uid in (0, service_uid) or entry.pw_gid == 0:
        raise Refusal(
            f"the pool user {user!r} maps to the administrator's or the pool's own account on "
            f"{os.uname().nodename}: sessions never run as those. Use a personal account."
        )
    return {
        "user": entry.pw_name,
        "uid": entry.pw_uid,
        "gid": entry.pw_gid,
        "groups": sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {0}),
        "home": entry.pw_dir,
    }


def account_of_uid(uid: int) -> Account:
    entry = pwd.getpwuid(uid)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise Refusal("a session never runs as root")
    return {
        "user": entry.pw_name,
        "uid": entry.pw_uid,
        "gid": entry.pw_gid,
        "groups": sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {0}),
        "home": entry.pw_dir,
    }


class Zygote:
    """The launcher's root zygote (``zygote.py``): started at once, restarted if it dies; forks
    are answered asynchronously (``forked`` with the request's id)."""

    def __init__(self, preload: list[str], launcher: Launcher) -> None:
        self.preload, self.launcher = preload, launcher
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.ready = False
        self._ids = 0

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "TZ", "JUPYTER_GPU_SESSION_LOG") or k.startswith("LC_")
        }
        argv = python_command(
            "jupyter_gpu.launcher.zygote",
            *("--socket-fd", str(theirs.fileno()), "--preload", ",".join(self.preload)),
            uid=0,
        )
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, env=env, cwd="/", pass_fds=(theirs.fileno(),)
        )
        theirs.close()
        self.sock, self.ready = ours, False
        self.launcher.selector.register(ours, selectors.EVENT_READ)

    def fork(self, spec: Confinement, msg: dict[str, Any], worker: str, fds: list[int]) -> int:
        """Ask for a confined session; waits for the zygote (its imports, then the fork)."""
        deadline = time.monotonic() + 600
        while not self.ready:
            if self.sock is None or time.monotonic() > deadline:
                raise Refusal("the launcher's zygote is not running; see the worker's log")
            self.read(timeout=1.0)
        self._ids += 1
        request = {"op": "fork", "id": self._ids, "env": dict(msg["env"]), "host": msg["host"]}
        assert self.sock is not None  # ready
        socket.send_fds(
            self.sock, [json.dumps({**request, "worker": worker, "confine": spec}).encode()], fds
        )
        for fd in fds:
            os.close(fd)
        while True:
            answer = self.read(timeout=60.0)
            if answer is None:
                raise Refusal("the launcher's zygote did not answer a fork")
            if answer.get("id") == self._ids and answer["op"] == "forked":
                return int(answer["pid"])
            if answer.get("id") == self._ids:
                raise Refusal(f"the launcher's zygote could not fork: {answer.get('error')}")

    def read(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """One message of the zygote (``exited`` ones are passed to the launcher); None when none
        came within ``timeout``."""
        if self.sock is None:
            return None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except (TimeoutError, BlockingIOError):
            return None
        except OSError:
            data = b""
        if not data:
            self.lost()
            return None
        msg = json.loads(data)
        if msg.get("op") == "ready":
            self.ready = True
        elif msg.get("op") == "exited":
            self.launcher.exited(int(msg["pid"]), int(msg["code"]))
        return msg

    def lost(self) -> None:
        if self.sock is not None:
            self.launcher.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        log.warning("the launcher's zygote exited; starting a new one")
        if not self.launcher.stopping:
            self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------------- started by the CLI
def fork_launcher(settings: Settings) -> tuple[int, str]:
    """Start the launcher (as a child of this root process, before it has threads or Dask): its
    socket in a fresh folder that root and the service account's group may enter. Returns its pid
    and its socket's path."""
    import tempfile
    import threading

    if threading.active_count() != 1:  # a fork copies one thread: the others' locks would hang it
        raise RuntimeError("the launcher must be forked before any thread starts")
    runtime = "/run" if os.access("/run", os.W_OK) else None

    folder = tempfile.mkdtemp(prefix="jupyter-gpu-launcher-", dir=runtime)
    os.chown(folder, 0, settings.service_gid)
    os.chmod(folder, 0o710)
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    os.chown(path, 0, settings.service_gid)
    os.chmod(path, 0o660)
    listener.listen(64)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _become_launcher(listener, folder, settings)
            code = 0
        except BaseException:
            log.exception("the launcher failed")
        finally:
            os._exit(code)
    listener.close()
    return pid, path


def _become_launcher(listener: socket.socket, folder: str, settings: Settings) -> None:
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        return
    os.chdir("/")
    from jupyter_gpu.common.safe_python import drop_unsafe_entries

    drop_unsafe_entries(uid=0)  # nothing another account can write is imported from here on
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s launcher[%(process)d] %(levelname)s %(message)s",
    )
    try:
        Launcher(settings, listener).serve_forever()
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
