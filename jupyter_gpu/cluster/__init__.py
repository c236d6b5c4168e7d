"""The pool side: GPU inventory, the broker (a Dask scheduler plugin), the GPU worker plugin that owns
session processes, the session process itself, and the embedded single-machine pool."""
