"""Whose account a session runs as, and the host-memory folder that belongs to it.

When the pool checks tokens and the worker runs as root, each session runs as the OS account named
like its pool user (``session/account.py`` does the switch). The worker looks the account up here,
refuses a user without one (saying how to fix it) and refuses ``root`` (a pool user must not become
the machine's administrator), and makes the session's own folder in host memory, owned by that
account and 0700, where its offloads and standby copies go.
"""

from __future__ import annotations

import os
import pwd

from jupyter_gpu.common.protocol import Account


class NoAccount(LookupError):
    """The pool user has no usable account on this machine; the message says what to do."""


def can_switch_users() -> bool:
    """Whether this worker can run sessions as other accounts (it runs as root)."""
    return os.geteuid() == 0


def account_of(user: str) -> Account:
    """The account of pool user ``user`` on this machine."""
    host = os.uname().nodename
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise NoAccount(
            f"the pool user {user!r} has no account on {host}, where the GPU is: sessions run as "
            "their "
            f"user. Ask the pool's admin to create it (e.g. `useradd {user}`) on every GPU "
            "machine, or "
            "use the name of your account as your pool user."
        ) from None
    if entry.pw_uid == 0:
        raise NoAccount(
            f"the pool user {user!r} maps to the administrator account on {host}: sessions do not "
            "run "
            "as root. Use a personal account."
        )
    groups = sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    return {
        "user": entry.pw_name,
        "uid": entry.pw_uid,
        "gid": entry.pw_gid,
        "groups": groups,
        "home": entry.pw_dir,
    }


def session_folder(base: str, lease: str, account: Account) -> str:
    """``base/lease``: the session's own host-memory folder, owned by its account, 0700."""
    path = os.path.join(base, lease)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chown(path, account["uid"], account["gid"])
    os.chmod(path, 0o700)
    return path
