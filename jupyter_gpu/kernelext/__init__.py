"""The notebook kernel's side: the ``%gpu`` and ``%%gpu`` magics and what runs a cell on the pool.

Loaded by ``%load_ext jupyter_gpu`` (``jupyter_gpu.load_ipython_extension``). It talks to the
broker through its Dask client (``connection.py``) and to its sessions on direct comms
(``session_calls.py``); it imports no broker, worker or pool-process code
(``tests/test_architecture.py``).
"""
