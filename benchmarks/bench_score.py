"""Scoring throughput on CPU: the job's scoring stage (Beam RunInference) vs plain torch loops.

    .venv/bin/python benchmarks/bench_score.py [--records 4096] [--model DIR] [--data DIR]
                                               [--single-lead 300]

Inputs are real 10 s 12-lead records (CinC 2021, 500 Hz) tokenized with the model's
tokenizer, repeated to `--records` rows. In one run it times:

* `plain loop`: the one-record-at-a-time loop a user would write: for each token row,
  make its tensors (`row_to_example`) and call the model on it;
* `model only, batch B`: `model(**collate(batch))` over examples made beforehand;
* `ScoreRecords, batch B`: a whole local Beam job (the project's FnApiRunner) of
  rows -> ScoreRecords (the job's own scoring stage: ToExamples ->
  RunInference(KeyedModelHandler(EcgModelHandler)) -> ToScoreRows) -> count, so Beam's
  per-element overhead, model loading and start-up are included. The rows arrive two
  ways, as in the two jobs that score: made inside the worker and fused with scoring (as
  `ecgtok run` hands rows from tokenizing straight on), and read from Parquet token
  shards with `ReadFromParquet` (as `ecgtok score` does). A one-row job gives the fixed
  start-up; `steady` is the rate with it taken off;
* `identity job`: the same jobs with an identity Map in place of ScoreRecords: Beam's own
  cost of moving the rows.

The rows do not come from `beam.Create(rows)`: its in-memory source costs about 9 ms per
12-lead token row on the FnApiRunner (110 rows/s with an identity Map), which no real job
pays, and it would hide the stage being measured.

`--single-lead N` adds the model-only rate (batch 64) on N single-lead CinC 2017 rows,
read once and, as a model with `flip_single_lead` scores them, both ways up: the cost of
the polarity flip.

Rates are rows (records) per second. Torch runs with as many threads as cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
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


def _single_lead_rates(data: str, tok, model, n: int) -> dict:
    """Model-only rows/s at batch 64 on n CinC 2017 rows, with and without the flip."""
    from ecgtok.models.model import row_to_example
    from ecgtok.transforms.record_tokens import tokenize_record

    heads = sorted(glob.glob(os.path.join(data, "cinc2017_af", "*.hea")))[:n]
    rows = [r for h in heads for r in tokenize_record(h, os.path.basename(h)[:-4], tok)]
    examples = [row_to_example(r) for r in rows]
    has_flip = model.flip_single_lead
    out = {"rows": len(rows), "beats": sum(len(r["r_peaks"]) for r in rows) / len(rows)}
    for flip in [True, False] if has_flip else [False]:
        model.flip_single_lead = flip
        out["flip" if flip else "no_flip"] = round(_model_rate(model, examples, 64), 1)
    model.flip_single_lead = has_flip
    return out


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


def _write_shard(rows, folder: str) -> str:
    """The rows as one Parquet token shard with the job's own token schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgtok.transforms.schemas import token_schema

    schema = token_schema()
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema)
    path = os.path.join(folder, "tokens-00000-of-00001.parquet")
    pq.write_table(table, path)
    return path


def _beam_seconds(
    model_dir: str, rows, batch: int, source: str, shard: str, identity: bool = False
) -> float:
    """Wall seconds of a whole local job: rows -> ScoreRecords (or identity) -> count."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from ecgtok.pipeline.options import local_runner
    from ecgtok.transforms.stages import ScoreRecords

    n, seeds = len(rows), rows[:8]

    def make_rows(_):
        # Built in the worker from 8 seed rows: no encoding before the scoring stage,
        # as when rows come fused from tokenizing.
        for i in range(n):
            yield dict(seeds[i % len(seeds)], record_id=f"r{i}")

    options = PipelineOptions([])
    t0 = time.perf_counter()
    with beam.Pipeline(runner=local_runner(options), options=options) as p:
        if source == "worker":
            pc = p | beam.Create([0]) | beam.FlatMap(make_rows)
        else:
            pc = p | beam.io.ReadFromParquet(shard)
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
    from ecgtok.pipeline.flags import default_model_dir, default_tokenizer_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--tokenizer", default=default_tokenizer_dir())
    ap.add_argument("--data", default=os.environ.get("ECGTOK_DATA", "../shared/data"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--single-lead", type=int, default=0, metavar="N")
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
    result = {"model_id": cfg["model_id"], "rows": len(rows), "plain_loop": round(plain, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "all"))
        os.makedirs(os.path.join(tmp, "one"))
        shards = {"all": _write_shard(rows, os.path.join(tmp, "all"))}
        shards["one"] = _write_shard(rows[:1], os.path.join(tmp, "one"))
        for source in ("worker", "parquet"):
            result[source] = _bench_source(args, model, examples, rows, source, shards, plain)
    if args.single_lead:
        tok = Tokenizer.load(args.tokenizer)
        result["single_lead"] = sl = _single_lead_rates(args.data, tok, model, args.single_lead)
        print(
            f"single-lead CinC 2017 rows ({sl['rows']}, {sl['beats']:.1f} beats each), model "
            f"only, batch 64: {sl.get('flip', '-')} rows/s read both ways up, "
            f"{sl['no_flip']} read once"
        )
    print(json.dumps(result))
    return 0


def _bench_source(args, model, examples, rows, source: str, shards: dict, plain: float) -> dict:
    """Print and return the job rates for one way of feeding rows to ScoreRecords."""
    label = {"worker": "rows made in the worker", "parquet": "rows read from a Parquet shard"}
    startup = _beam_seconds(args.model, rows[:1], 1, source, shards["one"])
    print(f"\n{label[source]}: job start-up (one row through ScoreRecords) {startup:.2f} s")
    print(
        f"{'batch':>6} {'model only rows/s':>18} {'ScoreRecords rows/s':>20} {'steady':>8} {'x plain':>8}"
    )
    out = {"startup_s": round(startup, 2), "by_batch": {}}
    for b in (int(x) for x in args.batches.split(",")):
        tr = _model_rate(model, examples, b)
        sec = _beam_seconds(args.model, rows, b, source, shards["all"])
        br, steady = len(rows) / sec, len(rows) / max(sec - startup, 1e-6)
        out["by_batch"][b] = {
            "model_only": round(tr, 1),
            "score_records": round(br, 1),
            "score_records_steady": round(steady, 1),
        }
        print(f"{b:>6} {tr:>18.1f} {br:>20.1f} {steady:>8.1f} {br / plain:>7.2f}x")
    sec = _beam_seconds(args.model, rows, 1, source, shards["all"], identity=True)
    out["identity_job"] = round(len(rows) / sec, 1)
    print(f"same job, identity Map instead of ScoreRecords: {len(rows) / sec:.1f} rows/s")
    return out


if __name__ == "__main__":
    sys.exit(main())
