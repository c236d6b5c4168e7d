"""The IPython shell that runs a session's cells.

Why IPython and not ``exec``: magics, ``display()``, rich reprs, the last expression's value and the
inline matplotlib backend behave exactly as in a notebook kernel, because they are the same
machinery. Its display publisher and display hook send messages (``session/output.py``) instead of
printing.
"""

from __future__ import annotations

from typing import Any

from jupyter_gpu.session.output import Relay


def make_shell(relay: Relay) -> Any:
    """An IPython shell whose display machinery sends messages instead of printing."""
    from jupyter_gpu.session.output import RelayDisplayPublisher

    RelayDisplayPublisher.relay = relay
    return prepare_shell()


def prepare_shell() -> Any:
    """This process's shell, made on the first call (about 40 ms of CPU: IPython's magics and
    matplotlib's backends), the same one afterwards: a worker's zygote calls it before it forks, so
    each forked session gets it made (``session/zygote.py``); ``make_shell`` gives it its relay."""
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from jupyter_gpu.session.output import CapturingDisplayHook, RelayDisplayPublisher

    if InteractiveShell.initialized():  # made already (here, or in the zygote before the fork)
        return InteractiveShell.instance()

    class CellNameCompiler(CachingCompiler):
        """Names each cell's code after the kernel's cell, so remote tracebacks point at the cell's
        lines."""

        next_name = "<gpu-cell>"

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return self.next_name

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    cfg.HistoryManager.enabled = False
    shell = InteractiveShell.instance(
        config=cfg,
        display_pub_class=RelayDisplayPublisher,
        displayhook_class=CapturingDisplayHook,
        compiler_class=CellNameCompiler,
    )
    # The kernel shows the error, rebuilt from what tracebacks.error_payload sends: formatting it
    # here too (IPython's verbose traceback, with pygments) would cost up to a second on every error
    # and interrupt.
    patched: Any = shell  # its methods replaced on the instance
    patched.showtraceback = lambda *args, **kwargs: None
    patched.showsyntaxerror = lambda *args, **kwargs: None
    patched._showtraceback = lambda *args, **kwargs: None
    try:
        import matplotlib  # noqa: F401

        shell.enable_matplotlib("inline")
    except Exception:  # noqa: BLE001 - no usable matplotlib backend: figures are not shown inline
        pass
    return shell
