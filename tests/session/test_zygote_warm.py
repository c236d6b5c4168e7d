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


def _warm(*kinds: str) -> list[dict]:
    """Run CHECK once per kind, at the same time (each a fresh interpreter)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHECK, kind],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MPLBACKEND": "agg"},
        )
        for kind in kinds
    ]
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def test_a_zygote_warms_what_sessions_need_and_stays_single_threaded():
    own, launcher = _warm("own", "launcher")
    # a zygote forks single-threaded: nothing warmed may leave a thread behind
    assert own["threads"] == 1 and launcher["threads"] == 1
    assert own["shell"] and own["tls"] == 1 and own["backends"]
    # the forked session's shell is the zygote's, displaying through the session's own relay
    assert own["same"] and own["value"] == 42
    assert "display" in own["sent"], own["sent"]
    assert "inline" in own["backend"], own["backend"]
    # the launcher's root zygote leaves the shell to each confined session
    assert not launcher["shell"], "a shell made as root would keep root's home in a user's session"
    assert launcher["tls"] == 1 and launcher["backends"]
