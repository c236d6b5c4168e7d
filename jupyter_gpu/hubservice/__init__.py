"""The pool as a JupyterHub service: the page at ``/services/<name>/`` (its own process).

JupyterHub starts it as a managed service (``python -m jupyter_gpu.hubservice``, the entry that
``jupyter_gpu.hubservice.config`` gives ``jupyterhub_config.py``), or the administrator runs it
next to the pool. It logs users in through the Hub (JupyterHub's ``HubOAuth``: only users whose
Hub token carries the service's access scope get in) and shows them the pool as a read-only page:
the GPUs and who holds what, the queue with its reasons, the teams' quotas. It talks to the pool's
scheduler like the panel does (``gpu_snapshot``), with the viewer's name and Hub token, so a Hub
admin is shown as such. It needs the ``hub`` extra (JupyterHub's client library).
"""
