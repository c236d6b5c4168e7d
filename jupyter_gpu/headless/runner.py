"""Execute a notebook headlessly against a GPU pool: ``jupyter-gpu run`` and the pytest plugin's
engine.

One kernel (``python3``) runs the notebook's code cells in order with nbclient. The kernel finds its
pool through ``JUPYTER_GPU_SCHEDULER``: the pool given, or a private embedded pool started for this
run and stopped after it, so a rerun never queues behind (or disturbs) the user's interactive
sessions.

Parameters are injected the way papermill does it: a cell tagged ``injected-parameters`` right after
the cell tagged ``parameters`` assigns them. A parameter that the ``parameters`` cell does not
assign (or a notebook without one) is refused before anything runs, where papermill only warns: the
notebook's own assignment would silently win. ``%%gpu`` cells ship the free names they use from the
kernel's namespace, so parameters reach the GPU without anything more.

Execution stops at the first failing cell. A failure names the cell (its 1-based position in the
source notebook and its ``In [n]``), shows its source and the traceback (for a ``%%gpu`` cell, the
remote part: the cell's own lines), ANSI colours stripped. A cell that runs past its timeout is
interrupted like a user would: the magic turns the interrupt into SIGINT for the remote code, then a
kill after the grace period. Whatever happens, the kernel is shut down at the end and the broker is
asked (``gpu_snapshot``) whether the kernel still holds a lease or a queued request; anything left
is ended.

A cell's metadata ``{"jupyter_gpu": {"timeout": S}}`` sets that cell's own limit (0: none), e.g. a
first ``%%gpu`` cell that may queue for a GPU. Cell tags: ``skip-execution`` (not run),
``raises-exception`` (must raise; the run goes on), ``parameters`` / ``injected-parameters`` as
above. ``requires-gpu`` is the pytest plugin's business.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, cast

import nbformat

from jupyter_gpu.headless.kernel import kernel_directory, kernel_env, manager_kwargs, strip_ansi

log = logging.getLogger(__name__)

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
SKIP_TAG = "skip-execution"
RAISES_TAG = "raises-exception"
REQUIRES_GPU_TAG = "requires-gpu"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2

# after a timeout's interrupt: the magic needs interrupt-grace to kill remote code that ignores
# SIGINT, plus time to say so; past this the kernel itself is deemed stuck and killed
_AFTER_INTERRUPT_MARGIN = 15.0


class CannotRun(Exception):
    """The notebook could not be run at all (bad file, bad parameter, no pool): exit code 2, not
    1."""


# ---------------------------------------------------------------------- parameters
def parse_value(text: str) -> Any:
    """A parameter value from the command line: a Python literal when it is one (``3``, ``0.5``,
    ``[1, 2]``, ``True``, ``'x'``), else the text itself as a string (``-p name resnet``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def inject_parameters(nb: Any, parameters: Iterable[tuple[str, Any]]) -> Any:
    """Insert (in place) a cell tagged ``injected-parameters`` assigning ``parameters``; returns
    ``nb``.

        String values given as ``(name, str)`` are parsed with :func:`parse_value`. An earlier
        injected cell (a rerun of an executed notebook) is replaced. No parameters: the notebook is
        left as it is.
    """
    params = [
        (name, parse_value(value) if isinstance(value, str) else value)
        for name, value in parameters
    ]
    if not params:
        return nb
    for name, _ in params:
        if not name.isidentifier():
            raise CannotRun(f"parameter name {name!r} is not a Python identifier")
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in _tags(c)]
    lines = ["# Parameters"] + [f"{name} = {value!r}" for name, value in params]
    cell = nbformat.v4.new_code_cell("\n".join(lines) + "\n", metadata={"tags": [INJECTED_TAG]})
    if nb.get("nbformat_minor", 5) < 5:
        cell.pop("id", None)
    at = next((i + 1 for i, c in enumerate(nb.cells) if PARAMETERS_TAG in _tags(c)), 0)
    nb.cells.insert(at, cell)
    return nb


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []) or [])


def parameter_names(nb: Any) -> list[str] | None:
    """The names the cell tagged ``parameters`` assigns (its defaults), or None when there is no
    such cell."""
    cell = next((c for c in nb.cells if PARAMETERS_TAG in _tags(c)), None)
    if cell is None:
        return None
    from jupyter_gpu.common.datacontract import cell_names

    return cell_names(cell.source)[1]


def check_parameters(nb: Any, names: Sequence[str], path: str = "the notebook") -> None:
    """Refuse parameters the notebook does not declare (raise ``CannotRun``).

    Why refuse, where papermill warns: a name that is not assigned in the ``parameters`` cell is
    a typo (``-p epoch 30`` for ``epochs``) or a notebook without a ``parameters`` cell, where
    the injected value is assigned first and then overwritten by the notebook's own ``epochs =
    150``: the run would silently use another value than the one asked for."""
    if not names:
        return
    for name in names:
        if not name.isidentifier():
            raise CannotRun(f"parameter name {name!r} is not a Python identifier")
    declared = parameter_names(nb)
    if declared is None:
        raise CannotRun(
            f"{path} has no cell tagged 'parameters', so -p {names[0]} ... would be overwritten by "
            "the "
            "notebook's own assignment. Tag the cell that sets the defaults 'parameters' "
            "(JupyterLab: "
            "the cell's Property Inspector, Common Tools > Cell Tags; the same tag papermill uses)."
        )
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise CannotRun(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            "the "
            f"cell tagged 'parameters' in {path} assigns {', '.join(declared) or 'nothing'}. Check "
            "the "
            "spelling, or assign the name in that cell."
        )


# ---------------------------------------------------------------------- results
@dataclass
class CellFailure:
    """Why a run stopped: which cell, what it raised (or that it timed out), and its traceback."""

    index: int  # 0-based, in the executed notebook (injected cell included)
    # 1-based position in the source notebook; None for the injected cell
    number: int | None
    source: str
    # error | timeout | notebook-timeout | dead-kernel | no-exception
    kind: str
    execution_count: int | None = None
    ename: str | None = None
    evalue: str | None = None
    traceback: str = ""  # ANSI stripped, the whole thing
    timeout: float | None = None

    @property
    def where(self) -> str:
        what = f"cell {self.number}" if self.number is not None else "the injected-parameters cell"
        return what + (f" (In [{self.execution_count}])" if self.execution_count else "")

    @property
    def remote(self) -> bool:
        return "<%%gpu cell" in self.traceback

    def summary(self) -> str:
        """One line: which cell and what happened."""
        if self.kind == "timeout":
            return f"{self.where} timed out after {self.timeout:g} s (cell timeout) and was interrupted"
        if self.kind == "notebook-timeout":
            return f"{self.where} was interrupted when the notebook's timeout of {self.timeout:g} s ran out"
        if self.kind == "dead-kernel":
            return f"the kernel died while running {self.where}"
        if self.kind == "no-exception":
            return f"{self.where} is tagged {RAISES_TAG} but raised nothing"
        return f"{self.where} raised {self.ename}: {self.evalue}"

    def report(self) -> str:
        """The cell, its source and its traceback (the remote part for a ``%%gpu`` cell), as plain
        text."""
        parts = [self.summary(), "", f"---- {self.where} source ----", self.source.rstrip()]
        if self.traceback:
            label = "remote traceback" if self.remote else "traceback"
            parts += ["", f"---- {label} ----", focus_traceback(self.traceback).rstrip()]
        return "\n".join(parts) + "\n"


def focus_traceback(text: str) -> str:
    """For a ``%%gpu`` cell, drop the kernel-side frames (the magic's call) before the cell's own
    lines."""
    marker = text.find("File <%%gpu cell")
    if marker < 0:
        return text
    lines = text.splitlines()
    head = []
    for line in lines:  # the header: the rule and "ValueError   Traceback (most recent call last)"
        if line.startswith(("Cell In", "File ")):
            break
        head.append(line)
    return "\n".join(head) + ("\n" if head else "") + text[marker:]


@dataclass
class NotebookRun:
    """The executed notebook and how the run went."""

    nb: Any
    failure: CellFailure | None = None
    cells_run: int = 0
    duration: float = 0.0
    kernel_id: str = ""
    pool: str = ""
    # leases/requests the runner had to end itself
    leftovers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failure is None


# ---------------------------------------------------------------------- execution
async def async_execute_notebook(
    nb: Any,
    *,
    pool: str,
    cwd: str | None = None,
    path: str | None = None,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    kernel_name: str = "python3",
    progress: Progress | None = None,
) -> NotebookRun:
    """Run ``nb`` (in place) on a new kernel that uses ``pool``; stop at the first failure.

    ``progress`` hears a line as each cell starts and ends, and every ``PROGRESS_EVERY`` seconds
    of a long cell its latest badge or progress line (``jupyter-gpu run`` prints them). The
    kernel is always shut down and its leases checked, whatever happened.
    """
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import ensure_async
    from nbclient import NotebookClient

    started = time.monotonic()
    cwd = cwd or (os.path.dirname(os.path.abspath(path)) if path else os.getcwd())
    directory = kernel_directory()
    kernel_id, km_kwargs = manager_kwargs(directory, kernel_name)
    km = AsyncKernelManager(**km_kwargs)
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=kernel_name,
        timeout=None,
        allow_errors=True,
        resources={"metadata": {"path": cwd}},
    )
    run = NotebookRun(nb=nb, kernel_id=kernel_id, pool=pool)
    cells = _CellRunner(client, km, run, cell_timeout, notebook_timeout, progress, started)
    try:
        async with client.async_setup_kernel(env=kernel_env(pool, path), cwd=cwd):
            log.info("kernel %s started in %.1f s", kernel_id, time.monotonic() - started)
            assert client.kc is not None  # async_setup_kernel made it
            msg_id = await ensure_async(client.kc.kernel_info())
            info = await client.async_wait_for_reply(msg_id)
            if info and "language_info" in info["content"]:
                nb.metadata["language_info"] = info["content"]["language_info"]
            await cells.run_all()
            client.set_widgets_metadata()
    finally:
        await _shut_down(client, km, run, cells.kill_now)
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        run.duration = time.monotonic() - started
    return run


class _CellRunner:
    """The cells of one notebook on one kernel, one after another until the first failure: each
    within its time limit (interrupted like a user would, then killed), each judged by its reply
    and its tags."""

    def __init__(
        self,
        client: Any,
        km: Any,
        run: NotebookRun,
        cell_timeout: float | None,
        notebook_timeout: float | None,
        progress: Progress | None,
        started: float,
    ) -> None:
        from jupyter_gpu.common import config

        self.client, self.km, self.run, self.progress = client, km, run, progress
        self.cell_timeout, self.notebook_timeout = cell_timeout, notebook_timeout
        self.replies: dict[int, dict] = {}
        client.on_cell_executed = lambda cell, cell_index, execute_reply: self.replies.__setitem__(
            cell_index, execute_reply
        )
        self.numbers = _source_numbers(run.nb)
        self.total = sum(1 for n in self.numbers if n is not None)
        self.deadline = started + notebook_timeout if notebook_timeout else None
        self.grace = config.get_seconds("interrupt-grace") + _AFTER_INTERRUPT_MARGIN
        self.kill_now = False  # the kernel did not stop: shut it down at once
        self.timed_out = False  # the cell running now ran past its limit

    async def run_all(self) -> None:
        for index, cell in enumerate(self.run.nb.cells):
            if cell.cell_type != "code" or not cell.source.strip() or SKIP_TAG in _tags(cell):
                continue
            limit, kind = _limit(_cell_timeout(cell, self.cell_timeout), self.deadline)
            if limit is not None and limit <= 0:
                self.run.failure = CellFailure(
                    index,
                    self.numbers[index],
                    cell.source,
                    "notebook-timeout",
                    timeout=self.notebook_timeout,
                )
                return
            if not await self._run_one(index, cell, limit, kind):
                return

    async def _run_one(self, index: int, cell: Any, limit: float | None, kind: str) -> bool:
        """Run one cell; whether to go on with the next."""
        from nbclient.exceptions import DeadKernelError

        number = self.numbers[index]
        cell_started = time.monotonic()
        where = f"cell {number or 'injected'}/{self.total}"
        if self.progress is not None:
            self.progress(f"{where}: {_first_line(cell.source)}")
        self.timed_out = False
        try:
            await self._execute(index, cell, limit, where)
        except (DeadKernelError, asyncio.CancelledError):
            self.run.cells_run += 1
            self.run.failure = (
                self._timeout(index, cell, kind, None)
                if self.timed_out
                else CellFailure(index, number, cell.source, "dead-kernel")
            )
            self.kill_now = True
            return False
        self.run.cells_run += 1
        log.info("cell %s ran in %.1f s", number, time.monotonic() - cell_started)
        reply = (self.replies.get(index) or {}).get("content", {})
        timed_out = self.timed_out
        if self.progress is not None:
            outcome = (
                "timed out"
                if timed_out
                else (
                    "raised " + str(reply.get("ename"))
                    if reply.get("status") == "error"
                    else "done"
                )
            )
            self.progress(f"{where}: {outcome} in {time.monotonic() - cell_started:.1f} s")
        if timed_out:
            self.run.failure = self._timeout(index, cell, kind, reply)
            cell.outputs.append(
                nbformat.v4.new_output(
                    "stream", name="stderr", text=f"[jupyter-gpu] {self.run.failure.summary()}\n"
                )
            )
            return False
        self.run.failure = _judged(index, number, cell, reply)
        return self.run.failure is None

    async def _execute(self, index: int, cell: Any, limit: float | None, where: str) -> None:
        """Execute the cell within ``limit``; past it (``timed_out``), interrupt the kernel like a
        user would (the magic stops and frees the remote work), again (the magic kills the remote
        session at once), then kill the kernel."""
        task = asyncio.ensure_future(
            self.client.async_execute_cell(
                cell, index, execution_count=self.client.code_cells_executed + 1
            )
        )
        done = await _wait_telling(task, limit, cell, where, self.progress)
        if done:
            await task
            return
        self.timed_out = True
        log.info("cell %s ran past %s s: interrupting the kernel", self.numbers[index], limit)
        await self.km.interrupt_kernel()
        done, _ = await asyncio.wait({task}, timeout=self.grace)
        if not done:
            await self.km.interrupt_kernel()
            done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            log.warning("the kernel did not stop after two interrupts: killing it")
            self.kill_now = True
            task.cancel()
            await self.km.shutdown_kernel(now=True)
        await task

    def _timeout(self, index: int, cell: Any, kind: str, reply: dict | None) -> CellFailure:
        return _timeout_failure(
            index,
            self.numbers[index],
            cell,
            kind,
            _cell_timeout(cell, self.cell_timeout),
            self.notebook_timeout,
            reply,
        )


def _judged(index: int, number: int | None, cell: Any, reply: dict) -> CellFailure | None:
    """A cell's failure by its reply and tags: an error (unless tagged ``raises-exception``), or
    no error where the tag expects one."""
    raises = RAISES_TAG in _tags(cell)
    if reply.get("status") == "error":
        if raises:
            return None
        return CellFailure(
            index,
            number,
            cell.source,
            "error",
            execution_count=cell.get("execution_count"),
            ename=reply.get("ename"),
            evalue=reply.get("evalue"),
            traceback=strip_ansi("\n".join(reply.get("traceback", []))),
        )
    if raises:
        return CellFailure(
            index, number, cell.source, "no-exception", execution_count=cell.get("execution_count")
        )
    return None


async def _shut_down(client: Any, km: Any, run: NotebookRun, kill_now: bool) -> None:
    """Stop the kernel (at once when it would not stop), then end whatever it still held in the
    pool."""
    from jupyter_core.utils import ensure_async

    from jupyter_gpu.headless.pool import async_release_kernel_leases

    stopping = time.monotonic()
    if client.kc is not None:
        with contextlib.suppress(Exception):
            # a coroutine in some jupyter_client versions, None in others
            await ensure_async(cast(Any, client.kc).stop_channels())
    with contextlib.suppress(Exception):
        if await km.is_alive():
            await km.shutdown_kernel(now=kill_now)
    with contextlib.suppress(Exception):
        await km.cleanup_resources()
    stopped = time.monotonic()
    with contextlib.suppress(Exception):
        run.leftovers = await async_release_kernel_leases(run.pool, run.kernel_id)
    log.info(
        "kernel shut down in %.1f s, its leases checked in %.1f s",
        stopped - stopping,
        time.monotonic() - stopped,
    )


Progress = Callable[[str], None]
#: how often ``jupyter-gpu run`` says where a long cell is
PROGRESS_EVERY = 10.0


async def _wait_telling(
    task: asyncio.Future, limit: float | None, cell: Any, where: str, progress: Progress | None
) -> set:
    """``asyncio.wait({task}, timeout=limit)``, telling ``progress`` every ``PROGRESS_EVERY``
    seconds what the cell shows last (its ``%%gpu`` badge or progress line), so a long run is not
    silent."""
    started = time.monotonic()
    while True:
        left = None if limit is None else limit - (time.monotonic() - started)
        step = PROGRESS_EVERY if progress is not None else None
        wait = left if step is None else (step if left is None else max(0.0, min(step, left)))
        done, _ = await asyncio.wait({task}, timeout=wait)
        if done or (left is not None and wait is not None and left <= wait):
            return done
        latest = _latest_line(cell)
        if progress is not None and latest:
            progress(f"{where}: {time.monotonic() - started:.0f} s, {latest}")


def _latest_line(cell: Any) -> str:
    """The last line a person would read in the cell now (a badge, a progress line, a print)."""
    for out in reversed(cell.get("outputs", [])):
        text = (
            out.get("text")
            if out.get("output_type") == "stream"
            else out.get("data", {}).get("text/plain")
        )
        lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:200]
    return ""


def _first_line(source: str) -> str:
    lines = [ln for ln in source.splitlines() if ln.strip()]
    first = lines[0][:80] if lines else ""
    return first + (" ..." if len(lines) > 1 else "")


def _cell_timeout(cell: Any, default: float | None) -> float | None:
    """A cell's own limit (metadata ``jupyter_gpu: {timeout: S}``, 0 for none) overrides the
    run's."""
    meta = cell.get("metadata", {}).get("jupyter_gpu", {}) or {}
    if "timeout" not in meta:
        return default
    try:
        value = float(meta["timeout"] or 0)
    except (TypeError, ValueError):
        log.warning(
            "cell metadata jupyter_gpu.timeout=%r is not a number of seconds: ignored",
            meta["timeout"],
        )
        return default
    return value if value > 0 else None


def _limit(cell_timeout: float | None, deadline: float | None) -> tuple[float | None, str]:
    """The time this cell may take, and which timeout that is."""
    remaining = deadline - time.monotonic() if deadline is not None else None
    if cell_timeout and (remaining is None or cell_timeout <= remaining):
        return float(cell_timeout), "timeout"
    if remaining is not None:
        return remaining, "notebook-timeout"
    return None, ""


def _timeout_failure(
    index: int,
    number: int | None,
    cell: Any,
    kind: str,
    cell_timeout: float | None,
    notebook_timeout: float | None,
    reply: dict | None,
) -> CellFailure:
    reply = reply or {}
    return CellFailure(
        index,
        number,
        cell.source,
        kind or "timeout",
        execution_count=cell.get("execution_count"),
        ename=reply.get("ename"),
        evalue=reply.get("evalue"),
        traceback=strip_ansi("\n".join(reply.get("traceback", []))),
        timeout=cell_timeout if kind == "timeout" else notebook_timeout,
    )


def _source_numbers(nb: Any) -> list[int | None]:
    """Each cell's 1-based position in the source notebook (the injected cell has none)."""
    numbers: list[int | None] = []
    n = 0
    for cell in nb.cells:
        if INJECTED_TAG in _tags(cell):
            numbers.append(None)
        else:
            n += 1
            numbers.append(n)
    return numbers


def execute_notebook(
    nb: Any,
    *,
    pool: str,
    cwd: str | None = None,
    path: str | None = None,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    kernel_name: str = "python3",
    progress: Progress | None = None,
) -> NotebookRun:
    """Synchronous :func:`async_execute_notebook` (runs its own event loop)."""
    return asyncio.run(
        async_execute_notebook(
            nb,
            pool=pool,
            cwd=cwd,
            path=path,
            cell_timeout=cell_timeout,
            notebook_timeout=notebook_timeout,
            kernel_name=kernel_name,
            progress=progress,
        )
    )


def default_output(path: str) -> str:
    """Where ``jupyter-gpu run`` saves the executed notebook by default: ``<name>.out.ipynb`` beside
    it."""
    base = path[: -len(".ipynb")] if path.endswith(".ipynb") else path
    return base + ".out.ipynb"


# ---------------------------------------------------------------------- the CLI entry point
def run_notebook(
    path: str,
    output: str | None = None,
    parameters: Sequence[tuple[str, Any]] = (),
    timeout: float | None = None,
    pool: str | None = None,
    notebook_timeout: float | None = None,
    kernel_name: str = "python3",
    stream: Any = None,
) -> int:
    """``jupyter-gpu run``: execute ``path``, save it with its outputs, return the exit code.

    0: every cell ran. 1: a cell failed or timed out (the report goes to ``stream``, stderr by
    default). 2: the notebook could not be run (missing or invalid file, bad parameter, no pool
    could be started). The executed notebook is saved to ``output`` (default
    ``<name>.out.ipynb`` beside the notebook; the source notebook is never overwritten), also
    when a cell failed: its outputs show what happened.
    """
    from jupyter_gpu.headless.pool import PrivatePool

    err = stream or sys.stderr
    output = output or default_output(path)
    try:
        if os.path.exists(output) and os.path.samefile(output, path):
            raise CannotRun(
                f"the output {output} is the notebook itself; give another path with -o"
            )
        try:
            nb = nbformat.read(path, as_version=4)
        except (OSError, ValueError) as exc:
            raise CannotRun(f"cannot read {path}: {exc}") from None
        check_parameters(nb, [name for name, _ in parameters], path)
        inject_parameters(nb, parameters)
    except CannotRun as exc:
        print(f"jupyter-gpu run: {exc}", file=err)
        return EXIT_CANNOT_RUN
    private = None
    try:
        if pool is None:
            private = PrivatePool(label="run")
            try:
                pool = private.start()
            # NoGpuAvailable, EmbeddedPoolError: their messages say what to do
            except Exception as exc:  # noqa: BLE001 - NoGpuAvailable, EmbeddedPoolError, ...: their messages say what to do
                print(f"jupyter-gpu run: could not start a GPU pool for {path}: {exc}", file=err)
                return EXIT_CANNOT_RUN
        result = execute_notebook(
            nb,
            pool=pool,
            path=path,
            cell_timeout=timeout,
            notebook_timeout=notebook_timeout,
            kernel_name=kernel_name,
            progress=lambda line: print(f"jupyter-gpu run: {line}", file=err, flush=True),
        )
    finally:
        if private is not None:
            private.stop()
    nb.metadata["jupyter_gpu"] = {
        "parameters": {
            name: repr(parse_value(v) if isinstance(v, str) else v) for name, v in parameters
        },
        "status": "passed" if result.passed else "failed",
        "duration_s": round(result.duration, 2),
        **(
            {"failed_cell": result.failure.number, "failure": result.failure.summary()}
            if result.failure
            else {}
        ),
    }
    try:
        nbformat.write(nb, output)
        saved = f"the executed notebook is saved to {output}"
    except OSError as exc:
        saved = f"the executed notebook could not be saved to {output}: {exc}"
    if result.failure is not None:
        print(f"jupyter-gpu run: {path} failed: {result.failure.report()}", file=err)
        print(f"jupyter-gpu run: {saved}", file=err)
        return EXIT_FAILED
    print(
        f"jupyter-gpu run: {path} passed ({result.cells_run} cells in {result.duration:.1f} s); "
        f"{saved}",
        file=err,
    )
    return EXIT_OK
