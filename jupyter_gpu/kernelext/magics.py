"""The ``%gpu`` line magics and the ``%%gpu`` cell magic.

A ``%%gpu`` cell: parse its options (``options``), prepare it (``pipeline``: name, inputs serialized
so that a bad one is refused before anything waits, the payload), then run it: in this kernel's
session (``single``, also ``--async``) or on N ranks (``scaleout``), both through
``runner.RankRunner``, and bring back what it assigned and re-raise what it raised (``results``).
The line form manages the pool.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from jupyter_gpu.common.refusals import Refused
from jupyter_gpu.errors import GpuPoolError
from jupyter_gpu.kernelext.connection import PoolConnection, resolve_address
from jupyter_gpu.kernelext.line_commands import LINE_HELP, parse_line
from jupyter_gpu.kernelext.options import options_help, parse_cell_options
from jupyter_gpu.kernelext.pipeline import prepare_cell
from jupyter_gpu.kernelext.rendering import remote_part, without_our_tail
from jupyter_gpu.kernelext.runs import RunBook
from jupyter_gpu.kernelext.scaleout import run_scaleout
from jupyter_gpu.kernelext.session_calls import pull
from jupyter_gpu.kernelext.single_gpu_cells import SessionCells

log = logging.getLogger(__name__)


def _documented(func: Callable) -> Callable:
    """``%gpu?`` shows the magic's docstring: the cell form's help, generated from the one
    declaration of the options (``options.gpu_options``), then the line commands."""
    func.__doc__ = f"{options_help()}\n{LINE_HELP}"
    return func


@magics_class
class GpuMagics(Magics):
    """``%gpu`` and ``%%gpu``; see ``%gpu?``."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.conn: PoolConnection | None = None
        self.cells = SessionCells(shell)
        self.jobs = self.cells.jobs  # the --async jobs, by id (``%gpu cancel J1``, ``%gpu status``)
        # each cell's runs: a new run id every time, --resume continues the latest
        self.runs = RunBook()

    # ------------------------------------------------------------------ entry
    @line_cell_magic
    @_documented
    def gpu(self, line: str, cell: str | None = None) -> Any:
        __tracebackhide__ = True
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # ------------------------------------------------------------------ connection
    def connect(
        self, address: str | None = None, keep: bool = False, quiet: bool = False
    ) -> PoolConnection:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        resolved, embedded = resolve_address(address, keep=keep)
        from jupyter_gpu.pool.discovery import address_reachable

        if not address_reachable(resolved, timeout=5):
            raise GpuPoolError(
                f"Could not reach the GPU pool at {resolved}: nothing answers there. Check the "
                "address (the scheduler that `jupyter-gpu pool up` printed) and that this machine "
                "can reach it; `%gpu connect` with no address uses an embedded pool on this "
                "machine."
            )
        try:
            self.conn = PoolConnection(resolved, embedded)
        except OSError as exc:
            raise GpuPoolError(
                f"Could not reach the GPU pool at {resolved}: {exc}. Check the address (the "
                "scheduler that `jupyter-gpu pool up` printed) and that this machine can reach "
                "it; `%gpu connect` with no address uses an embedded pool on this machine."
            ) from None
        if not quiet:
            snap = self.conn.scheduler_call("gpu_snapshot")
            kind = "embedded pool" if embedded else "pool"
            print(
                f"Connected to the {kind} at {resolved}: {len(snap['gpus'])} GPU(s)"
                + (" (virtual)" if snap["pool"].get("virtual") else "")
                + f", user {self.conn.user}."
            )
        return self.conn

    def _ensure_connection(self) -> PoolConnection:
        if self.conn is None:
            self.connect(quiet=True)
        assert self.conn is not None  # connect() made it, or raised
        return self.conn

    # ------------------------------------------------------------------ line magics
    def _line(self, line: str) -> Any:
        """``%gpu COMMAND ...``: the command's arguments are parsed and checked by its declaration
        (``line_commands.py``), then its ``_cmd_`` method runs."""
        command, args = parse_line(line)
        return getattr(self, f"_cmd_{command}")(args)

    def _cmd_help(self, args: argparse.Namespace) -> None:
        print(f"{LINE_HELP}\n{options_help()}")

    def _cmd_connect(self, args: argparse.Namespace) -> None:
        self.connect(args.address, keep=args.keep)

    def _cmd_status(self, args: argparse.Namespace) -> Any:
        from jupyter_gpu.kernelext.status_view import StatusView

        conn = self._ensure_connection()
        # with this kernel's user (and token): the pool says whether they may see everyone's work
        snap = conn.scheduler_call("gpu_snapshot", user=conn.user)
        return StatusView(snap, conn.user, conn.kernel, self.jobs, conn.session, conn.address)

    def _cmd_queue(self, args: argparse.Namespace) -> Any:
        from jupyter_gpu.kernelext.status_view import QueueView

        conn = self._ensure_connection()
        return QueueView(conn.scheduler_call("gpu_snapshot"), conn.user)

    def _cmd_cancel(self, args: argparse.Namespace) -> None:
        target = args.id
        if target in self.jobs:
            self.jobs[target].cancel()
            print(f"Cancelling --async job {target}.")
            return
        conn = self._ensure_connection()
        try:
            reply = conn.scheduler_call("gpu_cancel", id=target, user=conn.user)
        except Refused as exc:
            raise UsageError(f"%gpu cancel {target}: {exc}.") from None
        if conn.session is not None and conn.session.id == target:
            conn.session = None
        print(f"Cancelled {reply['what']}.")

    def _cmd_scale(self, args: argparse.Namespace) -> None:
        n = args.n
        conn = self._ensure_connection()
        try:
            reply = conn.scheduler_call("gpu_scale", n=n, user=conn.user)
        except Refused as exc:
            raise UsageError(f"%gpu scale: {exc}") from None
        print(
            f"The pool now has {reply['workers']} worker(s)"
            + (
                f" ({reply['jobs']} job(s) of its cluster manager)"
                if reply.get("jobs") != reply["workers"] and reply.get("jobs") is not None
                else ""
            )
            + "."
        )
        if reply.get("note"):
            print(reply["note"][0].upper() + reply["note"][1:] + ".")

    def _cmd_pull(self, args: argparse.Namespace) -> None:
        name = args.name
        assert self.shell is not None  # a registered magic has its shell
        if name in self.shell.user_ns_hidden or name.startswith("_"):
            raise UsageError(
                f"%gpu pull {name}: {name!r} is one of IPython's own names in this kernel "
                "(history, "
                "output cache or the shell itself); pulling it would overwrite that. Pull a "
                "variable "
                "your cells made, or copy it under another name in a %%gpu cell first "
                f"(e.g. `my_{name.strip('_') or 'copy'} = {name}`)."
            )
        conn = self._ensure_connection()
        self.shell.user_ns[name] = pull(conn, name)
        print(f"{name} is now a local copy ({type(self.shell.user_ns[name]).__name__}).")

    def _cmd_release(self, args: argparse.Namespace) -> None:
        if self.conn is None or self.conn.session is None:
            print("This kernel holds no GPU session.")
            return
        lease = self.conn.session.id
        self.conn.release()
        print(f"Released your GPU session (lease {lease}); the next %%gpu cell starts a new one.")

    # ------------------------------------------------------------------ the cell magic
    def _cell(self, line: str, cell: str) -> Any:
        """Every %%gpu cell takes the same path: parse, prepare (name, inputs, payload), then run on
        one GPU in the kernel's session (now, or as an --async job) or on N ranks."""
        __tracebackhide__ = True
        opts = parse_cell_options(line)
        conn = self._ensure_connection()
        job = prepare_cell(self.shell, conn, opts, cell, self.runs)
        if opts.spec.workers > 1:
            return run_scaleout(self.shell, conn, opts, job, self.runs)
        if opts.run_async:
            return self.cells.start_async(conn, opts, job)
        return self.cells.run(conn, opts, job, self.runs)


_magics: GpuMagics | None = None


def _show_pool_error(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """Pool errors are messages for the user, not bugs: show the message (and the remote part, where
    the cell was when it was stopped), not jupyter-gpu's own frames."""
    stb: list[str] = []
    cause = value.__cause__
    if (
        cause is not None
        and not isinstance(cause, GpuPoolError)
        and cause.__traceback__ is not None
    ):
        try:
            stb = list(
                shell.InteractiveTB.structured_traceback(
                    type(cause), cause, cause.__traceback__, tb_offset=0
                )
            )
            stb.append("\nThe remote code above was stopped:")
        except Exception:  # noqa: BLE001 - IPython's formatter on a rebuilt exception: show the plain line
            stb = []
    stb.append(f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}")
    shell._showtraceback(etype, value, stb)
    return stb


def _show_error(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """How the kernel shows an error: a pool error as its message (``_show_pool_error``), an
    exception a ``%%gpu`` cell raised from its own remote frames on (as it would read had the cell
    run here), one the magic raised here (an interrupt while the cell waited, a kill after the
    grace period) as its message, and any other error exactly as IPython does.

        In none of the ``%%gpu`` cases does the user read jupyter-gpu's frames or the notebook's
        ``get_ipython().run_cell_magic('gpu', ..., "<the whole cell>")`` line: they are the
        machinery, not the user's code. They go to this kernel's log (``jupyter_gpu`` logger, at
        DEBUG), and ``%debug`` still walks the remote frames."""
    if isinstance(value, GpuPoolError):
        return _show_pool_error(shell, etype, value, tb, tb_offset)
    remote = remote_part(value, tb)
    if remote is None and (isinstance(value, UsageError) or not _raised_in_the_magic(tb)):
        tb = without_our_tail(tb)
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        return []
    log.debug("%%%%gpu cell error", exc_info=(etype, value, tb))
    if isinstance(value, SyntaxError) and remote is None:  # the cell's line, with a caret
        stb = shell.SyntaxTB.structured_traceback(etype, value, [])
    elif remote is None:
        stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}"]
    else:
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, remote  # for %debug
        stb = shell.InteractiveTB.structured_traceback(etype, value, remote, tb_offset=0)
    shell._showtraceback(etype, value, stb)
    return stb


def _raised_in_the_magic(tb: Any) -> bool:
    """Whether ``tb`` went through a ``%%gpu`` cell's run (``GpuMagics._cell``)."""
    while tb is not None:
        if tb.tb_frame.f_code is GpuMagics._cell.__code__:
            return True
        tb = tb.tb_next
    return False


def load(ipython: Any) -> None:
    global _magics
    _magics = GpuMagics(ipython)
    ipython.register_magics(_magics)
    # every error passes through _show_error: IPython calls a custom handler by exception type, and
    # a remote exception keeps its own type (ValueError, a user's class), so the handler tells them
    # apart itself; an interrupt too (KeyboardInterrupt is no Exception), so that an interrupted
    # %%gpu cell shows its remote frames, not the notebook's run_cell_magic line
    ipython.set_custom_exc((Exception, KeyboardInterrupt), _show_error)


def unload(ipython: Any) -> None:
    global _magics
    if _magics is not None and _magics.conn is not None:
        _magics.conn.close()
    ipython.set_custom_exc((), None)
    _magics = None
