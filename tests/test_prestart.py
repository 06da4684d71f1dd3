"""Guarded children started before the launcher imports Beam (`isolation.prestart`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import copy_record, data_path
from test_pipeline import read_folder

from ecgtok.pipeline.cli import main as cli
from ecgtok.pipeline.flags import default_tokenizer_dir, local_guard_settings
from ecgtok.transforms import isolation
from ecgtok.transforms.isolation import GuardedTokenizer, discard_prestarted, prestart

RECORD = ("cinc2021_12lead", "G12EC", "E00001.hea")


def test_local_guard_settings_read_the_flags_a_local_job_uses():
    cores = os.cpu_count() or 1
    assert local_guard_settings(["--input", "a", "--output", "b"]) == (
        default_tokenizer_dir(),
        6144,
        (None, False),
        cores,
    )
    assert local_guard_settings(
        ["--tokenizer=/t", "--record_memory_mb", "900", "--direct_num_workers=3"]
        + ["--pseudonym_key_file", "/k", "--carry_identifiers", "--project", "p"]
    ) == ("/t", 900, ("/k", True), 3)
    # No children in this process: another runner, worker processes, no guard.
    assert local_guard_settings(["--runner", "DataflowRunner"]) is None
    assert local_guard_settings(["--direct_running_mode=multi_processing"]) is None
    assert local_guard_settings(["--isolation", "none"]) is None
    # A mistake is left to the real parse (one line, exit 2): no SystemExit here.
    assert local_guard_settings(["--isolation", "bogus"]) is None
    assert local_guard_settings(["--record_memory_mb", "lots"]) is None


def test_a_guard_takes_a_prestarted_child_only_with_the_same_settings():
    rec = data_path(*RECORD)
    tok = default_tokenizer_dir()
    try:
        prestart(tok, 0, (None, False), 2)
        prestart(tok, 0, (None, False), 2)  # tops up to 2, never more
        ready = isolation._PRESTARTED[(tok, 0, (None, False))]
        assert len(ready) == 2
        pids = {proc.pid for proc, _ in ready}

        other = GuardedTokenizer(tok, 60, 100_000)  # another memory bound: its own child
        other.tokenize(rec, "a", 300.0, {})
        assert other._child.pid not in pids and len(ready) == 2
        other.close()

        guard = GuardedTokenizer(tok, 60, 0, deid=_Deid())
        rows = guard.tokenize(rec, "G12EC/E00001", 300.0, {})
        assert guard._child.pid in pids and len(ready) == 1
        assert rows[0]["record_id"] == "G12EC/E00001" and len(rows[0]["r_peaks"]) > 5
        guard.close()

        left = ready[0][0]
        discard_prestarted()
        assert not isolation._PRESTARTED and not left.is_alive()
    finally:
        discard_prestarted()


class _Deid:
    """What a job hands the guard: DeidSettings' two fields."""

    key_file = None
    carry_identifiers = False


def test_a_job_uses_the_prestarted_children_and_leaves_none_behind(tmp_path, monkeypatch):
    rec = data_path(*RECORD)
    taken = []
    take = GuardedTokenizer._prestarted

    def spy(self):
        child = take(self)
        taken.append(child is not None)
        return child

    monkeypatch.setattr(GuardedTokenizer, "_prestarted", spy)
    arch = tmp_path / "arch"
    copy_record(rec, str(arch))
    out = tmp_path / "out"
    assert cli(["tokenize", "--input", str(arch), "--output", str(out)]) == 0
    assert taken and taken[0], "the job's guard did not take a pre-started child"
    assert len(read_folder(out / "tokens")) == 1
    assert not isolation._PRESTARTED  # the unused ones were ended with the job


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


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    discard_prestarted()
