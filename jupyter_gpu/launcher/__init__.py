"""The privileged launcher: what keeps root on a GPU machine, and nothing else (``server.py``).

Root is needed to give a session its user's account, a cgroup of its own and private mounts; the
launcher does exactly that, on the broker's signed grant, for the worker connections of the pool's
service account. ``server.py`` (the socket and the requests), ``confine.py`` (what a session
becomes before it runs anything), ``cgroups.py`` (its limits), ``hostfiles.py`` (its host-memory
folder, on descriptors only), ``zygote.py`` (the root zygote that forks sessions). It imports no
Dask network code: ``tests/test_architecture.py`` checks.
"""
