"""Imported once by the forkserver that guarded children are forked from (isolation.py)."""

import contextlib
import os

# Before NumPy loads: a guarded child uses one BLAS thread, and a forked child must not
# inherit a thread pool it does not have (fork copies only the calling thread).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

with contextlib.suppress(Exception):  # what fails here fails again, on a record
    from ecgtok.transforms.record_tokens import warm_up

    warm_up()
