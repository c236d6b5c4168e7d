"""A worker replacing its session zygote (``worker/forkserver.py``) while the reader of the old one
has not yet seen it die: the old reader's last act must not touch the new zygote.

Before: ``close()`` cancelled the old reader and ``start()`` made the new socket; when the loop then
ran the cancelled reader, its ``finally`` closed the *new* socket and failed the new waiters, so the
new zygote never said it was ready and the session start hung until its time limit (seen on a loaded
machine in ``test_forkserver.py::test_a_zygote_that_dies_is_replaced_at_the_next_start``: the cell
still ran after 120 s). A real zygote process here (nothing preloaded, so it starts in a moment).
"""

from __future__ import annotations

import asyncio
import os

from jupyter_gpu.worker.forkserver import ForkServer


def test_a_zygote_replaced_before_its_death_was_read_leaves_the_new_one_working():
    async def go() -> None:
        server = ForkServer(preload=[], env=dict(os.environ))
        server.start()
        try:
            await asyncio.wait_for(server.ready.wait(), 120)
            old = server.proc
            assert old is not None
            old.kill()
            old.wait()  # dead, its end of the socket closed; the loop has not run the reader since
            server.close()  # what a start does when it finds the zygote gone
            server.start()
            await asyncio.wait_for(server.ready.wait(), 120)
            await asyncio.sleep(0.2)  # the old reader's cancellation has run by now
            assert server.sock is not None and server.alive() and server.proc is not old
        finally:
            server.close()

    asyncio.run(go())
