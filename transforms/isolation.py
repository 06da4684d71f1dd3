"""Per-record time and memory bounds: each record is processed in a guarded child process.

A decoder that loops forever, a record that needs 50 GB, or a segfault in a C extension
must cost one error row, not the job. Beam's `with_exception_handling(use_subprocess=True)`
forks a process per element; this keeps one long-lived child per DoFn instance instead
(started once, with the tokenizer loaded once), sends it one record at a time, and:

* waits at most `timeout_s` for the answer, then kills and replaces the child;
* caps the child's address space at `memory_mb` (RLIMIT_AS), so a huge allocation fails
  with MemoryError inside the child instead of taking the worker down;
* turns a child that died (segfault, OOM kill) into an error row and starts a new one.

The child is started with `spawn`, never `fork`: the parent runs gRPC threads.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from ecgtok.transforms.errors import RecordError

STAGE = "limits"
STARTUP_TIMEOUT_S = 300.0
_TOKENIZER = None
_POLICY = None


def _init_child(memory_mb: int, tokenizer_dir: str, deid) -> None:
    global _TOKENIZER, _POLICY
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from ecgtok.models.tokenizer import Tokenizer

    _TOKENIZER = Tokenizer.load(tokenizer_dir)
    _POLICY = deid.policy() if deid is not None else None


def _ready() -> bool:
    return True


def _tokenize_in_child(source_path: str, record_id: str, segment_s: float, extra: dict):
    """Runs in the child. Returns ('ok', rows) or ('error', (stage, type, message))."""
    from ecgtok.transforms.record_tokens import tokenize_record

    try:
        rows = tokenize_record(source_path, record_id, _TOKENIZER, segment_s, extra, _POLICY)
        return "ok", rows
    except RecordError as err:
        return "error", (err.stage, err.error_type, err.message)
    except MemoryError:
        return "error", (STAGE, "out_of_memory", "record needs more memory than allowed")


class GuardedTokenizer:
    """Calls `tokenize_record` in a child process with a time and memory bound."""

    def __init__(
        self, tokenizer_dir: str, timeout_s: float, memory_mb: int, work=None, deid=None
    ) -> None:
        # `work` runs in the child; tests swap in a function that hangs or crashes.
        self._work = work or _tokenize_in_child
        self._tokenizer_dir = tokenizer_dir
        self._deid = deid
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._pool: ProcessPoolExecutor | None = None

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=mp.get_context("spawn"),
                initializer=_init_child,
                initargs=(self._memory_mb, self._tokenizer_dir, self._deid),
            )
            # Start-up (imports, tokenizer) must not eat into the first record's time.
            self._pool.submit(_ready).result(timeout=STARTUP_TIMEOUT_S)
        return self._pool

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def tokenize(self, source_path: str, record_id: str, segment_s: float, extra: dict) -> list:
        future = self._ensure_pool().submit(self._work, source_path, record_id, segment_s, extra)
        try:
            status, value = future.result(timeout=self._timeout_s)
        except FutureTimeout:
            self._discard_pool()
            raise RecordError(
                STAGE, "timeout", f"processing took longer than {self._timeout_s:g} s"
            ) from None
        except BrokenProcessPool:
            self._discard_pool()
            raise RecordError(
                STAGE,
                "worker_crashed",
                "the process handling this record died (crash or out of memory)",
            ) from None
        if status == "error":
            raise RecordError(*value)
        return value

    def close(self) -> None:
        self._discard_pool()
