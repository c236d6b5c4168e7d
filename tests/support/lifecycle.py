"""Test fixtures that start real things (hosts, a Slurm, pool services) and must remove them even
when starting fails half way."""

from __future__ import annotations

from typing import Any


class Started:
    """``with X(...) as x``: ``x.start()`` on entry, ``x.close()`` on exit, and ``close()`` also
    when ``start()`` itself fails, so a half-made fixture leaves nothing behind."""

    def start(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
