"""``python -m jupyter_gpu.session``: run one session process (started by the GPU worker)."""

from jupyter_gpu.session.main import main

main()
