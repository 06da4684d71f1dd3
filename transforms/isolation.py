"""Per-record time and memory bounds: each record is processed in a guarded child process.

A decoder that loops forever, a record that needs 50 GB, or a segfault in a C extension
must cost one error row, not the job. Beam's `with_exception_handling(use_subprocess=True)`
forks a process per element; this keeps one long-lived child per DoFn instance instead
(started once, with the tokenizer loaded once), sends it one record at a time over a
pipe, and:

* waits at most `timeout_s` for the answer, then kills and replaces the child;
* caps the child's address space at `memory_mb` (RLIMIT_AS), so a huge allocation fails
  with MemoryError inside the child instead of taking the worker down;
* turns a child that died (segfault, OOM kill) into an error row and starts a new one.

Children are forked from a **forkserver** that has done their imports once (NumPy,
SciPy's signal and ndimage, wfdb and pandas: about 1.4 s of CPU; `_child_preload.py`),
never forked from the parent itself, which runs gRPC threads. So a second child, or one
that replaces a child killed for time or memory, is ready in milliseconds instead of
paying those imports again, and a two-worker job pays them once instead of twice on its
two cores. `prestart` lets the local launcher start the forkserver before it imports
Beam, on the core the launcher leaves idle. Children with an address-space bound under
`WARM_UP_MIN_MB` are spawned fresh instead, and import lazily: under such a bound the
imports themselves may not fit, and must fail a record (an error row), not the child.
(Where the parent runs as `python -m module`, as Beam's own worker processes do under
`multi_processing` or on Dataflow, each child re-runs that module as `__mp_main__`, as a
spawned child did: a start there is not milliseconds.)

Why a bare pipe and not `concurrent.futures.ProcessPoolExecutor` (which this used
first): the executor moves every call through a queue-management thread and a feeder
thread in the parent, four thread hand-offs per record against Beam's own threads for
the GIL. That cost 3.7 ms of wall time per 10 s 12-lead record, a third of the record's
own work (`benchmarks/profile_record.py`, "guard IPC").
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import sys

from ecgtok.transforms.errors import RecordError

STAGE = "limits"
STARTUP_TIMEOUT_S = 300.0
# Requests written to the child ahead of its answers. Small requests (a path and an id):
# a few dozen never fill the pipe's buffer, so writing them cannot block.
PIPELINE_DEPTH = 32
# At or above this address-space bound (or with none, 0) children are forked from the
# warmed forkserver; below it they are spawned and import lazily. SciPy's imports need a
# few hundred MB, and under a tighter bound they should fail on the first record, as that
# record's error row, not on the child's start.
WARM_UP_MIN_MB = 1024
PRELOAD_MODULE = "ecgtok.transforms._child_preload"
# Set by PRELOAD_MODULE in the server before its imports; a forked child keeps them unless
# the parent sets them itself (libraries may read them again after the fork).
_SERVER_ENV = ("OPENBLAS_NUM_THREADS", "ARROW_DEFAULT_MEMORY_POOL", "JE_ARROW_MALLOC_CONF")
_TOKENIZER = None
_POLICY = None


def _init_child(memory_mb: int, tokenizer_dir: str, deid: tuple | None, env: dict) -> None:
    """`deid` is (key_file, carry_identifiers) or None: plain values, so unpickling the
    arguments does not import `pipeline.discovery`, and with it Beam (1.5 s per child).
    `env` is the parent's environment when it asked for this child: a forked child would
    otherwise see the forkserver's, as it was when the server started (a test's or a
    notebook's later STORAGE_EMULATOR_HOST, say)."""
    global _TOKENIZER, _POLICY
    server = {k: os.environ[k] for k in _SERVER_ENV if k in os.environ}
    os.environ.clear()
    os.environ.update(server)
    os.environ.update(env)
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from ecgtok.models.tokenizer import Tokenizer

    _TOKENIZER = Tokenizer.load(tokenizer_dir)
    if _forks(memory_mb):  # has the server's imports: this only redoes any that failed there
        from ecgtok.transforms.record_tokens import warm_up

        with contextlib.suppress(Exception):  # whatever fails here fails again on a record
            warm_up()
    if deid is not None:
        from ecgtok.transforms.formats.deid import DeidPolicy

        _POLICY = DeidPolicy.from_settings(*deid)
    else:
        _POLICY = None


def _child_main(conn, memory_mb: int, tokenizer_dir: str, deid, work, env: dict) -> None:
    """The child's loop: load once, then answer one request at a time until told to stop.

    Answers are ('done', value) or ('raise', exception): an exception (a transient I/O
    error, say) is re-raised in the parent, so Beam retries as if it ran in-process.
    """
    try:
        _init_child(memory_mb, tokenizer_dir, deid, env)
    except Exception as exc:  # the reason goes to the parent: one line, not a traceback
        with contextlib.suppress(OSError):
            conn.send(("failed", f"the guarded process could not start: {exc!r}"))
        return
    try:
        conn.send(("done", True))  # ready
    except OSError:  # the parent left while this child was starting (BrokenPipeError)
        return
    while True:
        try:
            args = conn.recv()
        except EOFError:  # the parent is gone
            return
        if args is None:
            return
        try:
            answer = ("done", work(*args))
        except Exception as exc:  # handed back to the parent as is (SystemExit ends the child)
            answer = ("raise", exc)
        try:
            data = pickle.dumps(answer)
            if answer[0] == "raise":
                pickle.loads(data)  # an exception that cannot be rebuilt must not cross
        except Exception as exc:
            kind = type(answer[1]).__name__ if answer[0] == "raise" else "answer"
            data = pickle.dumps(("raise", RuntimeError(f"{kind} could not be sent: {exc}")))
        conn.send_bytes(data)


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


def _forks(memory_mb: int) -> bool:
    """Whether children with this address-space bound are forked from the forkserver."""
    return memory_mb == 0 or memory_mb >= WARM_UP_MIN_MB


def _context(memory_mb: int):
    if not _forks(memory_mb):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Read when the server starts (once per process); later calls change nothing.
    ctx.set_forkserver_preload([PRELOAD_MODULE])
    return ctx


def _start_child(tokenizer_dir: str, memory_mb: int, deid: tuple | None, work) -> tuple:
    """Start a child, forked from the forkserver or spawned (see `_forks`); it answers
    "ready" once loaded. Returns (process, connection). The first forked child waits here
    until the forkserver has done its imports."""
    ctx = _context(memory_mb)
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_child_main,
        args=(child_conn, memory_mb, tokenizer_dir, deid, work, dict(os.environ)),
        daemon=True,
    )
    proc.start()
    child_conn.close()
    return proc, parent_conn


def prestart(memory_mb: int) -> bool:
    """Start the forkserver now, without waiting for it, if children with this bound are
    forked from it; returns whether it did. Its imports then run while the caller goes
    on (the local launcher imports Beam meanwhile), and every child is forked warm."""
    if not _forks(memory_mb):
        return False
    from multiprocessing import forkserver

    _context(memory_mb)
    forkserver.ensure_running()
    return True


def _end(proc, conn) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=5)
    conn.close()


class GuardedTokenizer:
    """Calls `tokenize_record` in a child process with a time and memory bound."""

    def __init__(
        self, tokenizer_dir: str, timeout_s: float, memory_mb: int, work=None, deid=None
    ) -> None:
        # `work` runs in the child; tests swap in a function that hangs or crashes.
        self._work = work or _tokenize_in_child
        self._tokenizer_dir = tokenizer_dir
        self._deid = None if deid is None else (deid.key_file, deid.carry_identifiers)
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._child = None
        self._conn = None
        self._child_work = None
        self._in_flight = 0  # requests sent whose answers are not read yet

    def _ensure_child(self):
        if self._child is not None and self._child_work is not self._work:
            self._discard_child()  # the work function changed (tests): a new child
        if self._child is None:
            proc, conn = _start_child(self._tokenizer_dir, self._memory_mb, self._deid, self._work)
            self._child, self._conn, self._child_work = proc, conn, self._work
            # Start-up (imports, tokenizer) must not eat into the first record's time.
            self._answer(STARTUP_TIMEOUT_S, "starting the guarded process")
        return self._conn

    def _answer(self, timeout_s: float, what: str):
        """The child's next answer, or a RecordError if it hangs or dies."""
        conn = self._conn
        if not conn.poll(timeout_s):
            self._discard_child()
            raise RecordError(STAGE, "timeout", f"{what} took longer than {timeout_s:g} s")
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):  # the child died: crash, or killed for memory
            self._discard_child()
            raise RecordError(
                STAGE,
                "worker_crashed",
                "the process handling this record died (crash or out of memory)",
            ) from None
        if kind == "raise":
            raise value
        if kind == "failed":  # the child could not start (see _child_main)
            self._discard_child()
            print(f"ecgtok: {value}", file=sys.stderr)
            raise RecordError(STAGE, "worker_crashed", value)
        return value

    def _discard_child(self) -> None:
        proc, conn = self._child, self._conn
        self._child = self._conn = self._child_work = None
        self._in_flight = 0
        if proc is not None:
            _end(proc, conn)

    def tokenize(self, source_path: str, record_id: str, segment_s: float, extra: dict) -> list:
        """One record's rows; raises RecordError (bounds, bad input) or a transient error."""
        ((_, outcome),) = self.tokenize_many([(source_path, record_id, segment_s, extra)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def tokenize_many(self, requests: list[tuple]):
        """Yield (index, rows or exception) for each (source_path, record_id, segment_s,
        extra) request, in order.

        All requests are written to the child at once and answered one by one, so the
        child never waits for the parent between records (the parent writes the rows of
        one record while the child reads the next). Each record keeps its own time
        bound; after a timeout or a crash the records not yet answered go to a new child.
        A transient error is yielded like any other exception; the caller re-raises it.
        """
        if self._in_flight:
            # A previous batch was abandoned mid-way (its caller raised): its answers are
            # still coming and must not be read as this batch's. Start from a new child.
            self._discard_child()
        pending = list(enumerate(requests))
        while pending:
            try:
                sent = self._send_all(pending)
            except RecordError as err:  # no child could start: each record says why
                for index, _ in pending:
                    yield index, err
                return
            for k, (index, _) in enumerate(pending[:sent]):
                try:
                    status, value = self._answer(self._timeout_s, "processing")
                    outcome = value if status == "ok" else RecordError(*value)
                except RecordError as err:
                    outcome = err
                except Exception as exc:  # raised in the child (transient I/O, say)
                    outcome = exc
                if self._child is not None:
                    self._in_flight -= 1
                yield index, outcome
                if self._child is None:  # that record killed or hung the child
                    pending = pending[k + 1 :]
                    break
            else:
                pending = pending[sent:]

    def _send_all(self, pending: list[tuple]) -> int:
        """Write the requests (at most PIPELINE_DEPTH) to the child; how many were sent."""
        batch = pending[:PIPELINE_DEPTH]
        for attempt in (0, 1):
            try:
                conn = self._ensure_child()
                for _, request in batch:
                    conn.send(request)
                    self._in_flight += 1  # counted as written: see tokenize_many
                return len(batch)
            except (BrokenPipeError, OSError):  # the idle child died: start another
                self._discard_child()
                if attempt:
                    raise
        return 0

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)  # ask the child to exit
        self._discard_child()
