"""``python -m jupyter_gpu.hubservice``: serve the pool's Hub service page."""

from jupyter_gpu.hubservice.app import main

main()
