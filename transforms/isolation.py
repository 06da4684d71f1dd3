"""Per-record time and memory bounds: records are processed in guarded child processes.

A decoder that loops forever, a record that needs 50 GB, or a segfault in a C extension
must cost one error row, not the job. Beam's `with_exception_handling(use_subprocess=True)`
forks a process per element; this keeps long-lived children instead (started once, with
the tokenizer loaded once, shared by a process's DoFns through `ChildPool`), sends each a
batch of records at a time over a pipe, and:

* hears which records the child starts on (`record_tokens.tokenize_batch`'s START
  events), and waits at most `timeout_s` for its next message, then kills and replaces
  the child: the record it was on gets the error row, and when it was on several at
  once (a group of short records), each of them is run again alone to find the culprit;
* caps the child's address space at `memory_mb` (RLIMIT_AS), so a huge allocation fails
  with MemoryError inside the child instead of taking the worker down;
* turns a child that died (segfault, OOM kill) into an error row the same way, and
  starts a new one for the batch's other records.

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
own work (`benchmarks/profile_record.py`, "guard IPC"). A batch's rows come back as one
Arrow table, sent as IPC bytes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading

from ecgtok.transforms.errors import TRANSIENT_ERRORS, RecordError

STAGE = "limits"
STARTUP_TIMEOUT_S = 300.0
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
    # A spawned child (tight bounds) has no server: the same allocator choice, before
    # pyarrow loads (see _child_preload).
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
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
    """The child's loop: load once, then work through one batch of requests at a time
    until told to stop.

    `work(requests)` yields events (kind, indices, payload), see
    `record_tokens.tokenize_batch`; each is sent as it comes, then ("end", None, None).
    If `work` itself raises, ("abort", None, exception) ends the batch instead: the
    parent hands the exception back (a transient I/O error: the runner retries) or
    retries the batch's unanswered records one by one.
    """
    try:
        _init_child(memory_mb, tokenizer_dir, deid, env)
    except Exception as exc:  # the reason goes to the parent: one line, not a traceback
        with contextlib.suppress(OSError):
            conn.send(("cannot_start", f"the guarded process could not start: {exc!r}"))
        return
    try:
        conn.send(("done", True))  # ready
    except OSError:  # the parent left while this child was starting (BrokenPipeError)
        return
    while True:
        try:
            requests = conn.recv()
        except EOFError:  # the parent is gone
            return
        if requests is None:
            return
        try:
            for event in work(requests):
                _send_event(conn, event)
            event = ("end", None, None)
        except Exception as exc:  # SystemExit ends the child
            event = ("abort", None, exc)
        _send_event(conn, event)


def _send_event(conn, event: tuple) -> None:
    """Send one event; an exception in it that cannot cross the pipe is replaced by a
    RuntimeError that says so (the record still gets its error row). A table of rows
    crosses as Arrow IPC bytes (see `_ipc_bytes`)."""
    kind, indices, payload = event
    arrow = sys.modules.get("pyarrow")  # a table can only exist once pyarrow is loaded
    if arrow is not None and isinstance(payload, arrow.Table):
        event = (ROWS_IPC, indices, _ipc_bytes(payload))
    try:
        data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        if isinstance(payload, BaseException):
            pickle.loads(data)  # an exception that cannot be rebuilt must not cross
    except Exception as exc:
        what = type(payload).__name__
        data = pickle.dumps((kind, indices, RuntimeError(f"{what} could not be sent: {exc}")))
    conn.send_bytes(data)


# The event a table of rows is sent as.
ROWS_IPC = "rows_ipc"


def _ipc_bytes(table) -> bytes:
    """A pyarrow table as Arrow IPC stream bytes: ~50 us to write and ~25 us to read
    for 32 records' rows, against ~200 and ~130 us to pickle and unpickle the table,
    on the child's core and the launcher's."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _ipc_table(data: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _tokenize_in_child(requests: list[tuple]):
    """Runs in the child: `record_tokens.tokenize_batch` with the child's tokenizer."""
    from ecgtok.transforms.record_tokens import tokenize_batch

    yield from tokenize_batch(requests, _TOKENIZER, _POLICY)


class _PerRecord:
    """Adapts a per-record `work(source_path, record_id, segment_s, extra)` returning
    ("ok", value) or ("error", (stage, type, message)) to the batch protocol (tests swap
    in functions that hang or crash on chosen records)."""

    def __init__(self, work) -> None:
        self.work = work

    def __call__(self, requests: list[tuple]):
        from ecgtok.transforms.record_tokens import FAILED, ROWS, START

        for index, request in enumerate(requests):
            yield START, [index], None
            try:
                status, value = self.work(*request)
            except Exception as exc:
                yield FAILED, [index], exc
                continue
            if status == "ok":
                yield ROWS, [index], value
            else:
                yield FAILED, [index], RecordError(*value)


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
    """Tokenizes batches of records in a child process, with a time and memory bound
    per record (`record_tokens.tokenize_batch` runs in the child)."""

    def __init__(
        self,
        tokenizer_dir: str,
        timeout_s: float,
        memory_mb: int,
        work=None,
        deid=None,
        batch_work=None,
    ) -> None:
        # What runs in the child: tests swap in functions that hang or crash, per record
        # (`work`) or per batch (`batch_work`, yielding `tokenize_batch`'s events).
        self._work = batch_work or (_tokenize_in_child if work is None else _PerRecord(work))
        self._tokenizer_dir = tokenizer_dir
        self._deid = _deid_key(deid)
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._child = None
        self._conn = None
        self._child_work = None
        self._busy = False  # a batch was sent and its "end" not read yet

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
        """The child's next message, or a RecordError if it hangs or dies."""
        conn = self._conn
        if not conn.poll(timeout_s):
            self._discard_child()
            raise RecordError(STAGE, "timeout", f"{what} took longer than {timeout_s:g} s")
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the child died: crash, or killed for memory
            self._discard_child()
            raise RecordError(
                STAGE,
                "worker_crashed",
                "the process handling this record died (crash or out of memory)",
            ) from None
        if message[0] == "cannot_start":  # see _child_main
            self._discard_child()
            print(f"ecgtok: {message[1]}", file=sys.stderr)
            raise RecordError(STAGE, "worker_crashed", message[1])
        return message

    def _discard_child(self) -> None:
        proc, conn = self._child, self._conn
        self._child = self._conn = self._child_work = None
        self._busy = False
        if proc is not None:
            _end(proc, conn)

    def tokenize(self, source_path: str, record_id: str, segment_s: float, extra: dict):
        """One record's rows (what the work returns: a table by default); raises
        RecordError (bounds, bad input) or a transient error."""
        ((_, outcome),) = self.tokenize_many([(source_path, record_id, segment_s, extra)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def tokenize_many(self, requests: list[tuple]):
        """Yield (indices, outcome) until every (source_path, record_id, segment_s, extra)
        request is answered once: outcome is the rows of those records (a table), or,
        for one record, the exception it failed with (RecordError; a transient error is
        yielded too, the caller re-raises it).

        The requests go to the child as one batch. Each record keeps its own time bound
        (the child says which record it starts, and the clock restarts). A record that
        hangs or kills the child gets the error row; the batch's other records go to a
        new child. If the child was working on several records at once, each of them is
        tried again alone, so the error lands on the record that caused it.
        """
        if self._busy:
            # A previous batch was abandoned mid-way (its caller raised): its answers are
            # still coming and must not be read as this batch's. Start from a new child.
            self._discard_child()
        queue = [list(range(len(requests)))]
        while queue:
            batch = queue.pop(0)
            yield from self._run_batch(requests, batch, queue)

    def _run_batch(self, requests: list[tuple], batch: list[int], queue: list):
        """Send one batch (indices into `requests`) and yield its answers; records left
        unanswered when the child fails are put back on `queue`."""
        try:
            self._send([requests[i] for i in batch])
        except RecordError as err:  # no child could start: each record says why
            for index in batch:
                yield [index], err
            return
        unanswered = set(range(len(batch)))
        suspects: list[int] = []  # the records the child said it is working on
        while True:
            try:
                kind, local, payload = self._answer(self._timeout_s, "processing")
            except RecordError as err:  # the child hung or died; it is gone
                # The records it said it was on and has not answered (all unanswered
                # ones if it said none): one is the culprit; several are each run again
                # alone, to find it. The rest go to a new child together.
                live = [k for k in suspects if k in unanswered] or sorted(unanswered)
                unanswered.difference_update(live)
                if len(live) == 1:
                    yield [batch[live[0]]], err
                else:
                    queue.extend([batch[k]] for k in live)
                if unanswered:
                    queue.append([batch[k] for k in sorted(unanswered)])
                return
            if kind == "start":
                suspects = local
            elif kind in ("failed", "rows", ROWS_IPC):
                unanswered.difference_update(local)
                if kind == ROWS_IPC:
                    payload = _ipc_table(payload)
                yield [batch[k] for k in local], payload
            else:  # "end", or "abort": the work itself raised
                self._busy = False
                if kind == "end" and unanswered:  # a work that skipped records: say so
                    payload = RuntimeError("the guarded process gave no answer for it")
                if unanswered:
                    if len(batch) == 1 or isinstance(payload, TRANSIENT_ERRORS):
                        for k in sorted(unanswered):
                            yield [batch[k]], payload
                    else:
                        queue.extend([batch[k]] for k in sorted(unanswered))
                return

    def _send(self, requests: list[tuple]) -> None:
        """Write one batch to the child (a new one if the idle child died)."""
        for attempt in (0, 1):
            try:
                conn = self._ensure_child()
                self._busy = True
                conn.send(requests)
                return
            except (BrokenPipeError, OSError):  # the idle child died: start another
                self._discard_child()
                if attempt:
                    raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)  # ask the child to exit
        self._discard_child()


def _deid_key(deid) -> tuple | None:
    return None if deid is None else (deid.key_file, deid.carry_identifiers)


class ChildPool:
    """Guarded children shared by the tokenizing DoFns of one process.

    Beam's local runner splits a stage's records into equal parts, one per worker
    thread, so a thread whose child runs a little slower (its core also runs the
    launcher) finished a second or more after the other, with one core idle. Here each
    DoFn adds one child to its process's pool and hands batches to the pool; any idle
    child takes the next batch, whichever thread sent it, so both children work until
    the last batch. Batches run in `GuardedTokenizer`s, with their bounds.

    `acquire` / `release` count the children DoFns add to a pool (one pool per set of
    settings: one child per DoFn on a runner with a worker thread per core, a child per
    core for a local `in_memory` job's single DoFn);
    `submit` queues a batch, and its outcomes (`GuardedTokenizer.tokenize_many`'s, as a
    list, or the exception that stopped them) go to the caller's queue with its tag.
    """

    _pools: dict[tuple, ChildPool] = {}
    _lock = threading.Lock()

    def __init__(self, settings: tuple) -> None:
        self._settings = settings
        self._work: queue.Queue = queue.Queue()
        self._users = 0

    @classmethod
    def acquire(
        cls,
        tokenizer_dir: str,
        timeout_s: float,
        memory_mb: int,
        deid=None,
        batch_work=None,
        children: int = 1,
    ) -> ChildPool:
        """The pool for these settings, with `children` more children for the caller
        (`batch_work`: see GuardedTokenizer)."""
        key = (tokenizer_dir, timeout_s, memory_mb, _deid_key(deid), batch_work)
        with cls._lock:
            pool = cls._pools.get(key)
            if pool is None:
                pool = cls._pools[key] = ChildPool(key)
            pool._users += children
        for _ in range(children):
            guard = GuardedTokenizer(
                tokenizer_dir, timeout_s, memory_mb, deid=deid, batch_work=batch_work
            )
            threading.Thread(target=pool._serve, args=(guard,), daemon=True).start()
        return pool

    def release(self, children: int = 1) -> None:
        """The caller's `children` stop (the last ones stop the pool)."""
        with self._lock:
            self._users -= children
            if self._users <= 0:
                self._pools.pop(self._settings, None)
        for _ in range(children):
            self._work.put(None)

    @property
    def children(self) -> int:
        return self._users

    def submit(self, requests: list[tuple], reply: queue.Queue, tag) -> None:
        self._work.put((requests, reply, tag))

    def _serve(self, guard: GuardedTokenizer) -> None:
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                requests, reply, tag = item
                try:
                    outcomes = list(guard.tokenize_many(requests))
                except BaseException as exc:  # handed to the caller, who raises it
                    outcomes = exc
                reply.put((tag, outcomes))
        finally:
            guard.close()
