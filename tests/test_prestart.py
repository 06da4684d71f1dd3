"""Guarded children forked warm from one forkserver, which the launcher starts before it
imports Beam (`isolation.prestart`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import copy_record, data_path
from test_pipeline import read_folder

from ecgtok.pipeline.cli import main as cli
from ecgtok.pipeline.flags import default_tokenizer_dir, local_guard_memory_mb
from ecgtok.transforms import isolation
from ecgtok.transforms.isolation import GuardedTokenizer, prestart
from ecgtok.transforms.schemas import token_schema

RECORD = ("cinc2021_12lead", "G12EC", "E00001.hea")
IO = ["--input", "in", "--output", "out"]


@pytest.fixture(autouse=True)
def _prestart_on(monkeypatch):
    monkeypatch.delenv("ECGTOK_PRESTART", raising=False)


def _bound_the_job_resolves(argv: list[str]) -> int:
    """The address-space bound the job's GuardedTokenizers will hold, as the job reads it."""
    from ecgtok.pipeline.run import _pipeline_options, _resolve

    _, opts = _pipeline_options(argv)
    return _resolve(opts, "tokenize", check_paths=False).limits.memory_mb


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--record_memory_mb", "900", "--direct_num_workers=3"],
        ["--record_memory_mb=0"],
        ["--pseudonym_key_file", "/k", "--carry_identifiers", "--project", "p"],
        ["--tokenizer", "TOK"],
    ],
)
def test_the_pre_parse_reads_the_bound_the_job_resolves(extra):
    argv = IO + [default_tokenizer_dir() if a == "TOK" else a for a in extra]
    assert local_guard_memory_mb(argv) == _bound_the_job_resolves(argv)


def test_no_forkserver_where_the_job_would_start_no_child_here_or_fail_at_once(tmp_path):
    for argv in (
        ["--runner", "DataflowRunner"],
        ["--direct_running_mode=multi_processing"],  # its workers are other processes
        ["--isolation", "none"],
        ["--dry_run=True"],
        ["--template_location", "gs://b/t"],
        ["--help"],
        ["--tokenizer", str(tmp_path / "missing")],
        ["--isolation", "bogus"],  # left to the real parse: one line, exit 2
        ["--record_memory_mb", "lots"],
    ):
        assert local_guard_memory_mb(IO + argv) is None, argv
    assert local_guard_memory_mb(["--input", "in"]) is None  # no --output


def _mapped(pid: int, part: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return part in f.read()


def child_environment(name: str, *_args):
    """A guard's work function: what the child sees of the parent's environment."""
    return "ok", [{"value": os.environ.get(name)}]


def test_children_are_forked_warm_from_one_forkserver_and_tokenize_as_in_process(
    monkeypatch,
):
    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.transforms.record_tokens import tokenize_record

    rec = data_path(*RECORD)
    tok = default_tokenizer_dir()
    assert prestart(0) and prestart(6144)  # idempotent: one server per process
    guards = [GuardedTokenizer(tok, 60, 6144) for _ in range(2)]
    try:
        rows = [g.tokenize(rec, "G12EC/E00001", 300.0, {}).to_pylist() for g in guards]
        parents = set()
        for g in guards:
            pid = g._child.pid
            with open(f"/proc/{pid}/stat") as f:
                parents.add(int(f.read().rsplit(")", 1)[1].split()[1]))
            assert _mapped(pid, "scipy/signal"), "the child did not inherit SciPy's imports"
        # Both forked by the same server, not by this process.
        assert len(parents) == 1 and os.getpid() not in parents
    finally:
        for g in guards:
            g.close()
    expected = tokenize_record(rec, "G12EC/E00001", Tokenizer.load(tok), 300.0, {})
    assert rows[0] == rows[1] == pa.Table.from_pylist(expected, token_schema()).to_pylist()

    # The environment is the parent's now, not the server's from when it started.
    monkeypatch.setenv("ECGTOK_TEST_LATE_VARIABLE", "set after the server started")
    guard = GuardedTokenizer(tok, 60, 0, work=child_environment)
    try:
        (row,) = guard.tokenize("ECGTOK_TEST_LATE_VARIABLE", "x", 300.0, {})
    finally:
        guard.close()
    assert row["value"] == "set after the server started"


def allocate_200_mb(*_args):
    """A guard's work function: a record that needs 200 MB more."""
    import numpy as np

    return "ok", [{"value": float(np.ones(25_000_000).sum())}]


def test_a_forked_child_has_its_bound_for_the_record_not_for_inherited_imports():
    """The forkserver's imports must not eat a 1 GB bound (pyarrow's jemalloc alone would
    reserve 1 GB of address space in every child; `_child_preload` asks for the system
    allocator)."""
    guard = GuardedTokenizer(default_tokenizer_dir(), 60, 1024, work=allocate_200_mb)
    try:
        (row,) = guard.tokenize("x", "x", 300.0, {})
        with open(f"/proc/{guard._child.pid}/status") as f:
            threads = [line for line in f if line.startswith("Threads:")]
    finally:
        guard.close()
    assert row["value"] == 25_000_000.0
    assert threads == ["Threads:\t1\n"]


def test_records_of_a_child_that_cannot_start_become_error_rows_in_a_batch(tmp_path):
    broken = str(tmp_path / "tok")
    os.makedirs(broken)
    guard = GuardedTokenizer(broken, 30, 0)
    try:
        requests = [(data_path(*RECORD), f"r{i}", 300.0, {}) for i in range(3)]
        outcomes = list(guard.tokenize_many(requests))
    finally:
        guard.close()
    assert [i for i, _ in outcomes] == [[0], [1], [2]]
    for _, err in outcomes:
        assert isinstance(err, isolation.RecordError) and "could not start" in err.message


def test_under_a_tight_bound_children_are_spawned_not_forked_warm():
    assert not prestart(300)
    guard = GuardedTokenizer(default_tokenizer_dir(), 60, 300)
    try:
        guard._ensure_child()
        with open(f"/proc/{guard._child.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    finally:
        guard.close()


def test_the_launcher_starts_the_forkserver_before_it_imports_beam(tmp_path):
    arch = tmp_path / "arch"
    copy_record(data_path(*RECORD), str(arch))
    out = tmp_path / "out"
    code = f"""
import sys
from multiprocessing import forkserver
seen = []
real = forkserver.ensure_running
def spy():
    seen.append("apache_beam" in sys.modules)
    real()
forkserver.ensure_running = spy
from ecgtok.pipeline.cli import main
code = main(["tokenize", "--input", {str(arch)!r}, "--output", {str(out)!r}])
print("RESULT", code, seen[:1])
"""
    env = {**os.environ, "NO_GCE_CHECK": "true"}
    env.pop("ECGTOK_PRESTART", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "RESULT 0 [False]" in done.stdout, done.stdout + done.stderr
    assert len(read_folder(out / "tokens")) == 1


def test_a_tight_memory_bound_still_gives_error_rows_not_a_failed_job(tmp_path, capsys):
    """Under a bound too tight for SciPy's imports, the child starts without importing
    ahead, and each record fails on its own, as an error row (warm_up is skipped)."""
    rec = data_path(*RECORD)
    arch = tmp_path / "arch"
    copy_record(rec, str(arch))
    out = tmp_path / "out"
    code = cli(["tokenize", "--input", str(arch), "--output", str(out), "--record_memory_mb=300"])
    capsys.readouterr()
    assert code == 0
    (err,) = read_folder(out / "errors")
    # The first import that does not fit fails the record (wfdb's pandas, at 300 MB).
    assert err["record_id"] == "E00001" and err["stage"] in ("read", "beats", "limits"), err


def test_warm_up_imports_what_the_first_record_would():
    """After warm_up, tokenizing a record imports nothing from SciPy, wfdb or pandas."""
    rec = data_path(*RECORD)
    code = f"""
import sys
from ecgtok.models.tokenizer import Tokenizer
from ecgtok.pipeline.flags import default_tokenizer_dir
from ecgtok.transforms.record_tokens import tokenize_record, warm_up
tok = Tokenizer.load(default_tokenizer_dir())
warm_up()
before = set(sys.modules)
tokenize_record({rec!r}, "x", tok, 300.0, {{}})
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("scipy", "wfdb", "pandas"))
print(new)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_child_that_cannot_start_says_so_in_one_line(tmp_path, capfd):
    broken = str(tmp_path / "tok")
    os.makedirs(broken)  # a folder, but no tokenizer in it
    guard = GuardedTokenizer(broken, 30, 0)
    try:
        with pytest.raises(isolation.RecordError) as info:
            guard.tokenize(data_path(*RECORD), "x", 300.0, {})
        assert info.value.error_type == "worker_crashed"
        # The error row says why, as the child saw it.
        assert "could not start" in info.value.message and "codebook" in info.value.message
    finally:
        guard.close()
    err = capfd.readouterr().err
    assert "the guarded process could not start" in err and "Traceback" not in err
