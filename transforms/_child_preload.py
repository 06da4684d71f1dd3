"""Imported once by the forkserver that guarded children are forked from (isolation.py).

The variables set here are kept in each child (`isolation._SERVER_ENV`)."""

import contextlib
import os

# Before NumPy loads: a guarded child uses one BLAS thread, and a forked child must not
# inherit a thread pool it does not have (fork copies only the calling thread).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# wfdb imports pandas, which imports pyarrow. With pyarrow's default memory pool a forked
# child starts at 1.46 GB of address space instead of 0.41 GB, and that would count against
# its --record_memory_mb bound (RLIMIT_AS); its bundled jemalloc also starts a background
# thread (another 0.07 GB), and the server should be single-threaded when it forks.
# Children build a small Arrow table per batch and write no Parquet: the system allocator
# will do.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")

with contextlib.suppress(Exception):  # what fails here fails again, on a record
    from ecgtok.transforms.record_tokens import warm_up

    warm_up()
