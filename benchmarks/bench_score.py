"""Scoring throughput on CPU: Beam RunInference vs a plain torch loop, side by side.

    .venv/bin/python benchmarks/bench_score.py [--records 2048] [--model DIR] [--data DIR]

Inputs are real 10 s 12-lead records (CinC 2021, 500 Hz) tokenized with the model's
tokenizer, repeated to `--records` rows. For each batch size (1, 16, 64) it times:

* `torch`: `model(**collate(batch))` in a loop (batch 1 is the one-record-at-a-time loop);
* `runinference`: a whole local Beam job (the project's FnApiRunner) of
  Create(keyed token rows) -> Map(row_to_example) -> RunInference(KeyedModelHandler(
  EcgModelHandler)) -> count, as the job's scoring stage does it,
  so Beam's per-element overhead and model loading are included. A job's fixed start-up
  (the same job over one record) is measured too, and `steady` is the rate with it
  taken off; the identity job (the same without RunInference) shows Beam's own cost.

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


def _torch_rate(model, examples, batch: int) -> float:
    import torch

    from ecgtok.models.model import collate

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(examples), batch):
            model(**collate(examples[i : i + batch]))
    return len(examples) / (time.perf_counter() - t0)


def _beam_seconds(model_dir: str, keyed, batch: int, identity: bool = False) -> float:
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from ecgtok.models.handler import EcgModelHandler
    from ecgtok.models.model import row_to_example
    from ecgtok.pipeline.options import local_runner

    options = PipelineOptions([])
    t0 = time.perf_counter()
    with beam.Pipeline(runner=local_runner(options), options=options) as p:
        # As in the job's ScoreRecords: token rows in, examples made right before inference
        # (fused into one stage, so no tensor is encoded between stages).
        pc = p | beam.Create(keyed) | beam.Map(lambda kv: (kv[0], row_to_example(kv[1])))
        if identity:
            pc = pc | beam.Map(lambda kv: kv)
        else:
            handler = KeyedModelHandler(EcgModelHandler(model_dir, "cpu", max_batch_size=batch))
            pc = pc | RunInference(handler)
        _ = pc | beam.combiners.Count.Globally()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import torch

    from ecgtok.models.model import load_model, row_to_example
    from ecgtok.models.tokenizer import Tokenizer
    from ecgtok.pipeline.options import default_model_dir, default_tokenizer_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2048)
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--tokenizer", default=default_tokenizer_dir())
    ap.add_argument("--data", default=os.environ.get("ECGTOK_DATA", "../shared/data"))
    ap.add_argument("--batches", default="1,16,64")
    args = ap.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    model, cfg = load_model(args.model)
    rows = _rows(args.data, Tokenizer.load(args.tokenizer), args.records)
    examples = [row_to_example(r) for r in rows]
    slim = ("record_id", "start_sample", "fs", "lead_names", "r_peaks", "tokens", "rhythm")
    keyed = [(r["record_id"], {k: r[k] for k in slim}) for r in rows]
    beats = sum(len(r["r_peaks"]) for r in rows) / len(rows)
    _torch_rate(model, examples[:32], 16)  # warm-up
    print(
        f"model {cfg['model_id']}, {len(rows)} rows of 12-lead 10 s records "
        f"({beats:.1f} beats each), {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}"
    )
    startup = _beam_seconds(args.model, keyed[:1], 1)
    print(f"Beam job start-up (one record through RunInference): {startup:.2f} s")
    print(f"{'batch':>6} {'torch rows/s':>14} {'RunInference rows/s':>20} {'steady rows/s':>14}")
    result = {
        "model_id": cfg["model_id"],
        "rows": len(rows),
        "startup_s": round(startup, 2),
        "by_batch": {},
    }
    for b in (int(x) for x in args.batches.split(",")):
        tr = _torch_rate(model, examples, b)
        sec = _beam_seconds(args.model, keyed, b)
        br, steady = len(keyed) / sec, len(keyed) / max(sec - startup, 1e-6)
        result["by_batch"][b] = {
            "torch": round(tr, 1),
            "runinference": round(br, 1),
            "runinference_steady": round(steady, 1),
        }
        print(f"{b:>6} {tr:>14.1f} {br:>20.1f} {steady:>14.1f}")
    sec = _beam_seconds(args.model, keyed, 1, identity=True)
    result["identity_job"] = round(len(keyed) / sec, 1)
    result["identity_job_steady"] = round(len(keyed) / max(sec - startup, 1e-6), 1)
    print(
        f"same job, identity Map instead of RunInference: {len(keyed) / sec:.1f} rows/s "
        f"({result['identity_job_steady']:.1f} steady)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
