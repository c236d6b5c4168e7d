"""What a zygote makes once for the sessions it forks (session/zygote.py ``warm_caches``), so that a
burst of first cells does not pay it per session (issue 24 item 3); each case in a fresh
interpreter, as a zygote is (the IPython shell is a per-process singleton)."""

import json
import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    import json, sys, threading
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib.backends.registry import backend_registry
    from tornado import netutil
    from jupyter_gpu.session import zygote

    own = sys.argv[1] == "own"
    zygote.warm_caches(own_account=own)
    out = {
        "threads": threading.active_count(),
        "shell": InteractiveShell.initialized(),
        "tls": netutil._client_ssl_defaults.cache_info().currsize,
        "backends": backend_registry._loaded_entry_points,
    }
    if own:
        # what a forked session then does: its shell is the one made above, given its relay
        from jupyter_gpu.session.output import Relay
        from jupyter_gpu.session.shell import make_shell

        made = InteractiveShell.instance()
        relay, sent = Relay(), []
        relay.begin(sent.append)
        shell = make_shell(relay)
        shell.display_pub.publish({"text/plain": "shown"})
        result = shell.run_cell("40 + 2")
        out.update(
            same=shell is made,
            sent=[m.get("op") for m in sent],
            value=result.result,
            backend=__import__("matplotlib").get_backend(),
        )
    print(json.dumps(out))
    """
)


def _warm(kind: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, kind],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "agg"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_workers_zygote_makes_the_sessions_shell_and_stays_single_threaded():
    out = _warm("own")
    # a zygote forks single-threaded: nothing warmed may leave a thread behind
    assert out["threads"] == 1
    assert out["shell"] and out["tls"] == 1 and out["backends"]
    # the forked session's shell is the zygote's, displaying through the session's own relay
    assert out["same"] and out["value"] == 42
    assert "display" in out["sent"], out["sent"]
    assert "inline" in out["backend"], out["backend"]


def test_the_launchers_root_zygote_leaves_the_shell_to_each_confined_session():
    out = _warm("launcher")
    assert out["threads"] == 1
    assert not out["shell"], "a shell made as root would keep root's home in a user's session"
    assert out["tls"] == 1 and out["backends"]
