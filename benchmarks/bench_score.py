"""Scoring throughput on CPU: the job's scoring stage (Beam RunInference) vs plain torch loops.

    .venv/bin/python benchmarks/bench_score.py [--records 4096] [--model DIR] [--data DIR]

Inputs are real 10 s 12-lead records (CinC 2021, 500 Hz) tokenized with the model's
tokenizer, repeated to `--records` rows. In one run it times:

* `plain loop`: the one-record-at-a-time loop a user would write: for each token row,
  make its tensors (`row_to_example`) and call the model on it;
* `model only, batch B`: `model(**collate(batch))` over examples made beforehand;
* `ScoreRecords, batch B`: a whole local Beam job (the project's FnApiRunner) of
  Create(token rows) -> ScoreRecords (the job's own scoring stage: ToExamples ->
  RunInference(KeyedModelHandler(EcgModelHandler)) -> ToScoreRows) -> count, so Beam's
  per-element overhead, model loading and start-up are included. A one-row job gives the
  fixed start-up; `steady` is the rate with it taken off;
* `identity job`: the same job with an identity Map in place of ScoreRecords: Beam's own
  cost of moving the rows.

Rates are rows (records) per second. Torch runs with as many threads as cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("NO_GCE_CHECK", "true")


def _rows(data: str, tok, n: int) -> list[dict]:
    from ecgtok.transforms.record_tokens import tokenize_record

    heads = sorted(glob.glob(os.path.join(data, "cinc2021_12lead", "G12EC", "*.hea")))[:8]
    if not heads:
        sys.exit(f"no CinC 2021 records under {data}")
    base = []
    for h in heads:
        rid = os.path.splitext(os.path.basename(h))[0]
        base += tokenize_record(h, rid, tok)
    return [dict(base[i % len(base)], record_id=f"r{i}") for i in range(n)]


def _plain_loop_rate(model, rows) -> float:
    """One record at a time, its tensors made in the loop."""
    import torch

    from ecgtok.models.model import collate, row_to_example

    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in rows:
            model(**collate([row_to_example(row)]))
    return len(rows) / (time.perf_counter() - t0)


def _model_rate(model, examples, batch: int) -> float:
    import torch

    from ecgtok.models.model import collate

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(examples), batch):
            model(**collate(examples[i : i + batch]))
    return len(examples) / (time.perf_counter() - t0)


def _beam_seconds(model_dir: str, rows, batch: int, identity: bool = False) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from ecgtok.pipeline.options import local_runner
    from ecgtok.transforms.stages import ScoreRecords

    options = PipelineOptions([])
    t0 = time.perf_counter()
    with beam.Pipeline(runner=local_runner(options), options=options) as p:
        # No reshuffle: in a job, token rows reach scoring fused with tokenizing or with
        # reading the shards, never through a shuffle.
        pc = p | beam.Create(rows, reshuffle=False)
        if identity:
            pc = pc | beam.Map(lambda r: r)
        else:
            pc = pc | ScoreRecords(model_dir, [], "cpu", batch)
        _ = pc | beam.combiners.Count.Globally()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import torch

    from ecgtok.models.model import load_model, row_to_example
    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.pipeline.options import default_model_dir, default_tokenizer_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--tokenizer", default=default_tokenizer_dir())
    ap.add_argument("--data", default=os.environ.get("ECGTOK_DATA", "../shared/data"))
    ap.add_argument("--batches", default="1,16,64")
    args = ap.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    model, cfg = load_model(args.model)
    rows = _rows(args.data, Tokenizer.load(args.tokenizer), args.records)
    examples = [row_to_example(r) for r in rows]
    beats = sum(len(r["r_peaks"]) for r in rows) / len(rows)
    _model_rate(model, examples[:32], 16)  # warm-up
    print(
        f"model {cfg['model_id']}, {len(rows)} rows of 12-lead 10 s records "
        f"({beats:.1f} beats each), {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}"
    )
    plain = _plain_loop_rate(model, rows)
    print(f"plain one-record-at-a-time loop (tensors made in the loop): {plain:.1f} rows/s")
    startup = _beam_seconds(args.model, rows[:1], 1)
    print(f"Beam job start-up (one row through ScoreRecords): {startup:.2f} s")
    print(
        f"{'batch':>6} {'model only rows/s':>18} {'ScoreRecords rows/s':>20} {'steady':>8} {'x plain':>8}"
    )
    result = {
        "model_id": cfg["model_id"],
        "rows": len(rows),
        "plain_loop": round(plain, 1),
        "startup_s": round(startup, 2),
        "by_batch": {},
    }
    for b in (int(x) for x in args.batches.split(",")):
        tr = _model_rate(model, examples, b)
        sec = _beam_seconds(args.model, rows, b)
        br, steady = len(rows) / sec, len(rows) / max(sec - startup, 1e-6)
        result["by_batch"][b] = {
            "model_only": round(tr, 1),
            "score_records": round(br, 1),
            "score_records_steady": round(steady, 1),
        }
        print(f"{b:>6} {tr:>18.1f} {br:>20.1f} {steady:>8.1f} {br / plain:>7.2f}x")
    sec = _beam_seconds(args.model, rows, 1, identity=True)
    result["identity_job"] = round(len(rows) / sec, 1)
    result["identity_job_steady"] = round(len(rows) / max(sec - startup, 1e-6), 1)
    print(
        f"same job, identity Map instead of ScoreRecords: {len(rows) / sec:.1f} rows/s "
        f"({result['identity_job_steady']:.1f} steady)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
