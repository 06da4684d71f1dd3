"""Classic Dataflow template staging, for real, into the local Cloud Storage emulator."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from conftest import REPO, data_path
from gcs_emulator import gcs  # noqa: F401 - the fixture

from ecgtok.pipeline.cli import main as cli

WORKER_MODULES = [
    "pipeline/run.py",
    "pipeline/discovery.py",
    "transforms/stages.py",
    "transforms/record_tokens.py",
    "transforms/qrs.py",
    "transforms/wfdb_reader.py",
    "transforms/isolation.py",
    "transforms/formats/__init__.py",
    "models/handler.py",
    "models/model.py",
    "models/tokenizer.py",
    "models/artifacts/tokenizer/codebook.npy",
    "models/artifacts/model/model.safetensors",
]


@pytest.mark.slow
def test_template_stages_the_sdist_with_every_worker_module(gcs, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(REPO)  # --setup_file is relative to where the user runs ecgtok
    src = data_path("cinc2021_12lead", "G12EC")
    template = gcs.url("templates/ecgtok-run")
    args = ["run", "--input", src, "--output", gcs.url("out/run1")]
    args += ["--runner=DataflowRunner", "--project=my-project", "--region=europe-west4"]
    args += [f"--temp_location={gcs.url('tmp')}", f"--staging_location={gcs.url('staging')}"]
    args += [f"--template_location={template}", "--setup_file=./setup.py"]
    assert cli(args) == 0, capsys.readouterr().err
    bucket = gcs.client().bucket(gcs.bucket)
    job = json.loads(bucket.blob("templates/ecgtok-run").download_as_bytes())
    assert job.get("steps") or job.get("pipelineDescription") or job.get("environment")
    staged = [b.name for b in bucket.list_blobs(prefix="staging/")]
    sdists = [n for n in staged if n.endswith(".tar.gz") and "workflow" in n]
    assert sdists, f"no sdist staged: {staged}"
    data = bucket.blob(sdists[0]).download_as_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {"/".join(n.split("/")[1:]) for n in tar.getnames()}
    missing = [m for m in WORKER_MODULES if m not in names]
    assert not missing, f"sdist lacks {missing}"
    # Nothing was run: no outputs were written.
    assert not list(bucket.list_blobs(prefix="out/"))
    assert os.path.exists(os.path.join(REPO, "setup.py"))
