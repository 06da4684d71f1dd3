"""Guarded children started before the launcher imports Beam (`isolation.prestart`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import copy_record, data_path
from test_pipeline import read_folder

from ecgtok.pipeline.cli import main as cli
from ecgtok.pipeline.discovery import DeidSettings
from ecgtok.pipeline.flags import default_tokenizer_dir, local_guard_settings
from ecgtok.transforms import isolation
from ecgtok.transforms.isolation import GuardedTokenizer, discard_prestarted, prestart

RECORD = ("cinc2021_12lead", "G12EC", "E00001.hea")
IO = ["--input", "in", "--output", "out"]


@pytest.fixture(autouse=True)
def _no_leftovers(monkeypatch):
    monkeypatch.delenv("ECGTOK_PRESTART", raising=False)
    yield
    discard_prestarted()


def _guard_settings_of_the_job(argv: list[str]) -> tuple:
    """What the job itself resolves from argv, as its GuardedTokenizers will hold it."""
    from ecgtok.pipeline.options import local_runner
    from ecgtok.pipeline.run import _pipeline_options, _resolve

    options, opts = _pipeline_options(argv)
    cfg = _resolve(opts, "tokenize", check_paths=False)
    local_runner(options)  # sets the local default of direct_num_workers
    from apache_beam.options.pipeline_options import DirectOptions

    workers = options.view_as(DirectOptions).direct_num_workers
    deid = (cfg.deid.key_file, cfg.deid.carry_identifiers)
    return cfg.tokenizer_dir, cfg.limits.memory_mb, deid, workers


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--record_memory_mb", "900", "--direct_num_workers=3"],
        ["--pseudonym_key_file", "/k", "--carry_identifiers", "--project", "p"],
        ["--tokenizer", "TOK"],
        ["--direct_num_workers=1"],
        ["--direct_running_mode", "in_memory"],
    ],
)
def test_the_pre_parse_reads_the_settings_the_job_resolves(extra):
    argv = IO + [default_tokenizer_dir() if a == "TOK" else a for a in extra]
    assert local_guard_settings(argv) == _guard_settings_of_the_job(argv)


def test_no_children_where_the_job_would_start_none_or_fail_at_once(tmp_path):
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
        assert local_guard_settings(IO + argv) is None, argv
    assert local_guard_settings(["--input", "in"]) is None  # no --output


def test_a_guard_takes_a_prestarted_child_only_with_the_same_settings(tmp_path):
    rec = data_path(*RECORD)
    tok = default_tokenizer_dir()
    other_tok = str(tmp_path / "tok")
    shutil.copytree(tok, other_tok)
    prestart(tok, 0, (None, False), 2)
    prestart(tok, 0, (None, False), 2)  # tops up to 2, never more
    ready = isolation._PRESTARTED[(tok, 0, (None, False))]
    assert len(ready) == 2
    pids = {proc.pid for proc, _ in ready}
    # Another memory bound, tokenizer, pseudonym key or carry switch: never this child.
    for folder, memory, key, carry in (
        (tok, 100_000, None, False),
        (other_tok, 0, None, False),
        (tok, 0, "/k", False),
        (tok, 0, None, True),
    ):
        guard = GuardedTokenizer(folder, 60, memory, deid=DeidSettings(key, carry))
        try:
            assert guard._prestarted() is None
        finally:
            guard.close()
    assert len(ready) == 2

    guard = GuardedTokenizer(tok, 60, 0, deid=DeidSettings(None, False))
    try:
        rows = guard.tokenize(rec, "G12EC/E00001", 300.0, {})
        assert guard._child.pid in pids and len(ready) == 1
        assert rows[0]["record_id"] == "G12EC/E00001" and len(rows[0]["r_peaks"]) > 5
    finally:
        guard.close()
    left = ready[0][0]
    discard_prestarted()
    assert not isolation._PRESTARTED and not left.is_alive()


def test_a_job_uses_the_prestarted_children_and_ends_the_rest(tmp_path, monkeypatch):
    rec = data_path(*RECORD)
    started, taken = [], []
    spawn, take = isolation._spawn_child, GuardedTokenizer._prestarted

    def spy_spawn(*args):
        child = spawn(*args)
        started.append(child[0])
        return child

    def spy_take(self):
        child = take(self)
        taken.append(child is not None)
        return child

    monkeypatch.setattr(isolation, "_spawn_child", spy_spawn)
    monkeypatch.setattr(GuardedTokenizer, "_prestarted", spy_take)
    arch = tmp_path / "arch"
    copy_record(rec, str(arch))
    out = tmp_path / "out"
    assert cli(["tokenize", "--input", str(arch), "--output", str(out)]) == 0
    assert taken and taken[0], "the job's guard did not take a pre-started child"
    assert len(read_folder(out / "tokens")) == 1
    assert not isolation._PRESTARTED
    for proc in started:  # the used ones closed by the job, the others ended after it
        proc.join(timeout=10)
        assert not proc.is_alive()


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
    finally:
        guard.close()
    err = capfd.readouterr().err
    assert "the guarded process could not start" in err and "Traceback" not in err
