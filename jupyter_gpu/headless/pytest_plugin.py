"""pytest plugin ``jupyter_gpu``: notebooks as tests on a GPU pool, and fixtures for users' own
tests.

Registered through the ``pytest11`` entry point, so installing jupyter-gpu makes it available;
notebook collection is off until ``--nbgpu`` (or ``nbgpu = true`` in the ini file) because a
project's notebooks are not all meant to be tests. Each ``*.ipynb`` (except ``*.out.ipynb``, the
runner's outputs) becomes one test item; a failing cell fails the item with the cell's number,
source and (remote) traceback.

All notebook items and the ``gpu_pool`` fixture of one pytest process share one pool, started on
first use and stopped when pytest ends. Under pytest-xdist each worker is its own pytest process
with its own runtime file and so its own pool: ``pytest -n 2`` really runs two notebooks side by
side.

Cell tags: ``skip-execution`` (not run), ``raises-exception`` (must raise), ``requires-gpu`` (the
whole notebook is skipped, with the reason, when the pool has no real GPU: its cells would need
CUDA).

Options: ``--nbgpu``, ``--nbgpu-cell-timeout S``, ``--nbgpu-notebook-timeout S``, ``--nbgpu-pool
ADDRESS`` (use a running pool); ini: ``nbgpu``, ``nbgpu_cell_timeout``, ``nbgpu_notebook_timeout``,
``nbgpu_pool``, ``nbgpu_virtual_gpus`` (the virtual GPUs of the embedded pool when the machine has
none; ``2x16GiB``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr

log = logging.getLogger(__name__)

DEFAULT_VIRTUAL_GPUS = "2x16GiB"


# ---------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nbgpu", "notebooks as tests on a GPU pool (jupyter-gpu)")
    group.addoption(
        "--nbgpu",
        action="store_true",
        default=False,
        help="collect *.ipynb files as tests, run on a GPU pool (ini: nbgpu = true)",
    )
    group.addoption(
        "--nbgpu-cell-timeout",
        default=None,
        metavar="SECONDS",
        help="interrupt a notebook cell that runs longer (its remote work is stopped, its lease "
        "freed)",
    )
    group.addoption(
        "--nbgpu-notebook-timeout",
        default=None,
        metavar="SECONDS",
        help="interrupt a notebook whose cells together run longer",
    )
    group.addoption(
        "--nbgpu-pool",
        default=None,
        metavar="ADDRESS",
        help="use this running pool instead of starting an embedded one",
    )
    parser.addini(
        "nbgpu", type="bool", default=False, help="collect *.ipynb files as tests (like --nbgpu)"
    )
    parser.addini(
        "nbgpu_cell_timeout", default="", help="per-cell timeout of notebook tests (30, 30s, 5min)"
    )
    parser.addini(
        "nbgpu_notebook_timeout", default="", help="per-notebook timeout of notebook tests"
    )
    parser.addini(
        "nbgpu_pool", default="", help="address of a running pool to use for notebook tests"
    )
    parser.addini(
        "nbgpu_virtual_gpus",
        default=DEFAULT_VIRTUAL_GPUS,
        help="virtual GPUs of the embedded test pool on machines without a GPU",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nbgpu: a notebook run as a test by jupyter-gpu")
    config.stash[_POOL_KEY] = SessionPool(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None:
        pool.close()


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("nbgpu") or config.getini("nbgpu"))


def _seconds(value: Any) -> float | None:
    if value in (None, ""):
        return None
    from dask.utils import parse_timedelta

    seconds = float(parse_timedelta(str(value).strip(), default="seconds"))
    return seconds if seconds > 0 else None


def _timeouts(config: pytest.Config) -> tuple[float | None, float | None]:
    cell = config.getoption("nbgpu_cell_timeout") or config.getini("nbgpu_cell_timeout")
    notebook = config.getoption("nbgpu_notebook_timeout") or config.getini("nbgpu_notebook_timeout")
    return _seconds(cell), _seconds(notebook)


# ---------------------------------------------------------------------- the session's pool
class SessionPool:
    """The one pool of a pytest process: a running one (``--nbgpu-pool``) or a private embedded one.

    Started lazily, so a session that runs no notebook and uses no ``gpu_pool`` starts nothing.
    """

    def __init__(self, config: pytest.Config):
        self.config = config
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self._address: str | None = None
        self._private: Any = None
        self._real_gpu: bool | None = None
        self._error: str | None = None

    def address(self) -> str:
        if self._address is not None:
            return self._address
        if self._error is not None:
            raise pytest.UsageError(self._error)
        explicit = self.config.getoption("nbgpu_pool") or self.config.getini("nbgpu_pool")
        if explicit:
            self._address = explicit
            return explicit
        from jupyter_gpu.headless.pool import PrivatePool

        # a private runtime file per pytest process (per xdist worker): never the user's embedded
        # pool
        self._private = PrivatePool(
            virtual_gpus=self._virtual_spec(), label=f"pytest-{self.worker}"
        )
        try:
            self._address = self._private.start()
        except Exception as exc:  # noqa: BLE001 - whatever stopped the pool becomes the usage error
            self._private.stop()
            self._private = None
            self._error = f"jupyter-gpu: could not start the test pool: {exc}"
            raise pytest.UsageError(self._error) from None
        return self._address

    def _virtual_spec(self) -> str | None:
        """Real GPUs where the machine has them; else virtual ones (JUPYTER_GPU_VIRTUAL_GPUS
        wins)."""
        from jupyter_gpu.common.inventory import nvml_gpus
        from jupyter_gpu.common.protocol import VIRTUAL_ENV

        if os.environ.get(VIRTUAL_ENV):
            return None
        if nvml_gpus():
            return None
        return self.config.getini("nbgpu_virtual_gpus") or DEFAULT_VIRTUAL_GPUS

    def has_real_gpu(self) -> bool:
        """Whether the pool offers a real GPU (what ``requires-gpu`` cells need); asks the
        broker."""
        if self._real_gpu is None:
            from jupyter_gpu.headless.pool import pool_has_real_gpu

            self._real_gpu = pool_has_real_gpu(self.address())
        return self._real_gpu

    def close(self) -> None:
        if self._private is not None:
            self._private.stop()
            self._private = None
        self._address = None


_POOL_KEY = pytest.StashKey[SessionPool]()


def session_pool(config: pytest.Config) -> SessionPool:
    """The pool shared by this pytest process's notebook items and its ``gpu_pool`` fixture."""
    return config.stash[_POOL_KEY]


# ---------------------------------------------------------------------- collection
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix != ".ipynb" or not _enabled(parent.config):
        return None
    if file_path.name.endswith(".out.ipynb") or ".ipynb_checkpoints" in file_path.parts:
        return None
    return NotebookFile.from_parent(parent, path=file_path)


class NotebookFile(pytest.File):
    """A notebook: one item (its cells share one kernel, so they are one test)."""

    def collect(self) -> Iterator[pytest.Item]:
        item = NotebookItem.from_parent(self, name=self.path.name)
        item.add_marker(pytest.mark.nbgpu)
        yield item


class NotebookFailed(Exception):
    """A notebook item failed; carries the run for the report."""

    def __init__(self, run: Any):
        super().__init__(run.failure.summary())
        self.run = run


class NotebookItem(pytest.Item):
    """Runs the notebook on a fresh kernel against the session's pool; fails at the first failing
    cell."""

    nb: Any = None

    def setup(self) -> None:
        import nbformat

        from jupyter_gpu.headless.runner import REQUIRES_GPU_TAG, _tags

        self.nb = nbformat.read(str(self.path), as_version=4)
        needs = [i + 1 for i, c in enumerate(self.nb.cells) if REQUIRES_GPU_TAG in _tags(c)]
        if needs and not session_pool(self.config).has_real_gpu():
            pytest.skip(
                f"cell {needs[0]} is tagged {REQUIRES_GPU_TAG} and the pool has no real GPU "
                "(only virtual ones)"
            )

    def runtest(self) -> None:
        from jupyter_gpu.headless.runner import execute_notebook

        pool = session_pool(self.config).address()
        cell_timeout, notebook_timeout = _timeouts(self.config)
        run = execute_notebook(
            self.nb,
            pool=pool,
            path=str(self.path),
            cell_timeout=cell_timeout,
            notebook_timeout=notebook_timeout,
        )
        if run.leftovers:
            self.warn(
                pytest.PytestWarning(
                    f"{self.name}: the pool still held {', '.join(run.leftovers)} for "
                    "the notebook's kernel after it stopped; they were ended"
                )
            )
        if run.failure is not None:
            output = _cell_text(self.nb.cells[run.failure.index])
            if output.strip():
                self.add_report_section("call", f"output of {run.failure.where}", output)
            raise NotebookFailed(run)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, NotebookFailed):
            return f"{self.path.name}: {excinfo.value.run.failure.report()}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"notebook {self.name}"


def _cell_text(cell: Any, max_lines: int = 40) -> str:
    """The last lines of a cell's stream outputs (what it printed before failing)."""
    text = "".join(
        o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
    )
    lines = text.splitlines()
    return "\n".join(lines[-max_lines:])


# ---------------------------------------------------------------------- fixtures for users' tests
@pytest.fixture(scope="session")
def gpu_pool(pytestconfig: pytest.Config) -> str:
    """The address of this test session's GPU pool (an embedded pool of virtual GPUs on a machine
    without one), shared with the notebook items; stopped when the session ends."""
    return session_pool(pytestconfig).address()


@pytest.fixture
def gpu_kernel(gpu_pool: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A started IPython kernel with ``%load_ext jupyter_gpu`` run, using ``gpu_pool``.

    ``gpu_kernel.execute(code)`` runs code as a notebook cell (``%%gpu`` included) and returns a
    ``CellResult`` (``.stdout``, ``.text``, ``.result``, ``.outputs``); it raises when the code
    raises unless ``allow_error=True``. At teardown the kernel is shut down and the pool checked
    for leftovers.
    """
    from jupyter_gpu.headless.kernel import GpuKernel

    kernel = GpuKernel(gpu_pool, cwd=str(request.path.parent)).start()
    try:
        yield kernel
    finally:
        leftovers = kernel.stop()
        if leftovers:
            log.warning("gpu_kernel left %s in the pool; they were ended", ", ".join(leftovers))
