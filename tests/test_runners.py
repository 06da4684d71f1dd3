"""The same job on several runners: parity, dry runs, and clear failures for missing jars."""

from __future__ import annotations

import os
import time

import pytest
from conftest import copy_record, data_path
from test_pipeline import read_folder

from ecgtok.pipeline.cli import main as cli

RECORDS = ["G12EC/E00001", "G12EC/E00005", "PTB_PTBXL/HR00003", "ChapmanShaoxing_Ningbo/JS00001"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = data_path("cinc2021_12lead")
    arch = tmp_path_factory.mktemp("arch")
    for rid in RECORDS:
        folder, name = os.path.split(rid)
        copy_record(os.path.join(root, rid + ".hea"), str(arch / folder), name)
    # A long two-lead record too, so segments and larger batches are compared.
    copy_record(data_path("mitdb", "208.hea"), str(arch / "mitdb"), "208")
    return str(arch)


def _sorted_rows(folder: str) -> list[dict]:
    return sorted(read_folder(folder), key=lambda r: (r["record_id"], r["start_sample"]))


RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable_loopback": [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=LOOPBACK",
    ],
}


@pytest.mark.slow
def test_three_runners_give_identical_tokens_and_scores(archive, tmp_path, capsys):
    results = {}
    for name, extra in RUNNERS.items():
        dst = str(tmp_path / name)
        assert cli(["run", "--input", archive, "--output", dst, *extra]) == 0, name
        results[name] = (
            _sorted_rows(os.path.join(dst, "tokens")),
            _sorted_rows(os.path.join(dst, "scores")),
        )
    capsys.readouterr()
    ref_tokens, ref_scores = results["in_process"]
    assert len(ref_tokens) == len(RECORDS) + 7  # 208 is 30 min: six 5-minute segments + a tail
    for name, (tokens, scores) in results.items():
        assert tokens == ref_tokens, f"token rows differ on {name}"
        assert [(s["record_id"], s["start_sample"]) for s in scores] == [
            (s["record_id"], s["start_sample"]) for s in ref_scores
        ]
        for a, b in zip(scores, ref_scores, strict=True):
            for head in ("p_af", "p_noisy", "p_other_rhythm"):
                assert a[head] == pytest.approx(b[head], abs=1e-5), (name, head)


def test_scores_do_not_depend_on_batch_size(archive, tmp_path, capsys):
    a, b = str(tmp_path / "b1"), str(tmp_path / "b64")
    assert cli(["run", "--input", archive, "--output", a, "--score_batch_size=1"]) == 0
    assert cli(["run", "--input", archive, "--output", b, "--score_batch_size=64"]) == 0
    capsys.readouterr()
    sa, sb = _sorted_rows(os.path.join(a, "scores")), _sorted_rows(os.path.join(b, "scores"))
    assert len(sa) == len(sb) > len(RECORDS)
    for x, y in zip(sa, sb, strict=True):
        assert x["p_af"] == pytest.approx(y["p_af"], abs=1e-5)
        assert x["embedding"] == pytest.approx(y["embedding"], abs=1e-4)


@pytest.mark.parametrize("flag", ["--dry_run", "--dry_run=True"])
def test_dataflow_dry_run_builds_offline_and_writes_nothing(archive, tmp_path, flag, capsys):
    local_out = tmp_path / "never"
    for out in (str(local_out), "gs://ecgtok-no-such-bucket/out"):
        args = ["run", "--input", archive, "--output", out, "--runner=DataflowRunner"]
        args += ["--project=my-project", "--region=europe-west4"]
        args += ["--temp_location=gs://ecgtok-no-such-bucket/tmp", flag]
        start = time.perf_counter()
        assert cli(args) == 0
        assert time.perf_counter() - start < 60
    out, _ = capsys.readouterr()
    assert "dry run" in out
    assert not local_out.exists()


@pytest.mark.parametrize(
    "runner_args, needle",
    [
        (["--runner=FlinkRunner"], "--flink_job_server_jar"),
        (["--runner=FlinkRunner", "--flink_job_server_jar=/no/such.jar"], "does not exist"),
        (["--runner=SparkRunner"], "--spark_job_server_jar"),
        (["--runner=PrismRunner"], "--prism_location"),
    ],
)
def test_runner_that_needs_a_download_fails_at_once(archive, tmp_path, runner_args, needle, capsys):
    start = time.perf_counter()
    code = cli(["run", "--input", archive, "--output", str(tmp_path / "o"), *runner_args])
    elapsed = time.perf_counter() - start
    _, err = capsys.readouterr()
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert elapsed < 30
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ("multi_threading", os.cpu_count() or 1)),
        (["--direct_num_workers=1"], ("multi_threading", 1)),  # Beam's default value, kept
        (["--direct_running_mode", "in_memory"], ("in_memory", 1)),  # likewise
        (["--direct_running_mode=in_memory", "--direct_num_workers=3"], ("in_memory", 3)),
        (["--direct_running_mode=multi_processing"], ("multi_processing", os.cpu_count() or 1)),
        (["--direct_num_workers=0"], ("multi_threading", os.cpu_count() or 1)),
    ],
)
def test_the_local_runner_keeps_what_the_user_set(argv, expected):
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from ecgtok.pipeline.options import local_children, local_runner

    options = PipelineOptions(argv)
    local_runner(options)
    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == expected
    # A job with a pool of guarded children keeps them too, with a child per worker
    # (in_memory: its one worker feeds a child per core).
    pooled = PipelineOptions(argv)
    local_runner(pooled, pooled=True)
    direct = pooled.view_as(DirectOptions)
    if argv:
        assert (direct.direct_running_mode, direct.direct_num_workers) == expected
    else:  # nothing given: one worker thread in_memory, feeding a child per core
        assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", 1)
    cores = os.cpu_count() or 1
    in_memory = direct.direct_running_mode == "in_memory"
    want = max(1, cores // direct.direct_num_workers) if in_memory else 1
    assert local_children(pooled) == want
