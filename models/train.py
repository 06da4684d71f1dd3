"""Training commands: fit-tokenizer (a Beam job), pretrain and finetune (torch).

    ecgtok fit-tokenizer --input SRC --output DIR [--vocab-size 512] [--max-beats 120000] [--seed 0]
    ecgtok pretrain --tokens DIR [DIR ...] --output DIR [--epochs 3] [--tokenizer DIR]
    ecgtok finetune --tokens DIR [DIR ...] --labels CSV --output DIR [--init DIR] [--epochs 8]

fit-tokenizer samples beat windows across the archive with a seeded hash priority and
keeps the `max-beats` smallest priorities with Beam's `Top` combiner, so its memory is
bounded whatever the archive's size and the sample is the same on every runner.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems
from ecgtok.models.tokenizer import Tokenizer, _join, _read_bytes, fit_codebook, tokenizer_meta


def _priority(seed: int, record_id: str, beat: int, lead: int) -> int:
    key = f"{seed}|{record_id}|{beat}|{lead}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def beat_samples(ref, seed: int, per_record: int):
    """(priority, window) pairs for up to `per_record` beats × leads of one record."""
    from ecgtok.transforms import windows as W
    from ecgtok.transforms.errors import RecordError
    from ecgtok.transforms.record_tokens import find_beats
    from ecgtok.transforms.wfdb_reader import read_record

    try:
        rec = read_record(ref.source_path, ref.record_id)
        r_peaks, flags = find_beats(rec)
    except RecordError:
        return
    from ecgtok.transforms.beats import FLAG_NOISE_MASK

    clean = W.clean_for_windows(rec.signal, rec.fs)
    wins = W.beat_windows(clean, W.to_window_rate(r_peaks, rec.fs))
    items = []
    for b in range(wins.shape[0]):
        if flags.size and flags[b] & FLAG_NOISE_MASK:
            continue
        for lead in range(wins.shape[1]):
            # Plain bytes: cheap to encode between stages on every runner.
            items.append((_priority(seed, ref.record_id, b, lead), wins[b, lead].tobytes()))
    items.sort(key=lambda t: t[0])
    yield from items[:per_record]


def sample_beats(
    src: str, out_dir: str, max_beats: int, seed: int, per_record: int, beam_args: list[str]
):
    """Run the sampling Beam job and return the sampled windows (N, 96), sorted by priority."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from ecgtok.pipeline.options import is_local_default, local_runner
    from ecgtok.transforms.stages import DiscoverRecords

    options = PipelineOptions(beam_args)
    runner = local_runner(options) if is_local_default(options) else None
    # The sample travels back through a file beside the output, so any runner can run it.
    sample_path = _join(out_dir, "_beat_sample.npy")
    with beam.Pipeline(runner=runner, options=options) as p:
        _ = (
            p
            | "DiscoverRecords" >> DiscoverRecords(src)
            | "SampleBeats" >> beam.FlatMap(beat_samples, seed, per_record)
            | "KeepSmallestPriorities" >> beam.combiners.Top.Smallest(max_beats, key=lambda t: t[0])
            | "WriteSample" >> beam.Map(_write_sample, sample_path)
        )
    data = _read_bytes(sample_path)
    FileSystems.delete([sample_path])
    beats = np.load(io.BytesIO(data), allow_pickle=False)
    if beats.shape[0] == 0:
        raise SystemExit("ecgtok: error: no beats found in --input")
    return beats


def _write_sample(items, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    from ecgtok.transforms.windows import WINDOW_LEN

    arr = np.frombuffer(b"".join(w for _, w in items), dtype=np.float32).reshape(-1, WINDOW_LEN)
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def fit_tokenizer_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ecgtok fit-tokenizer")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--max-beats", type=int, default=120_000)
    ap.add_argument("--per-record", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args, beam_args = ap.parse_known_args(argv)
    if not FileSystems.exists(args.output):
        FileSystems.mkdirs(args.output)
    beats = sample_beats(
        args.input, args.output, args.max_beats, args.seed, args.per_record, beam_args
    )
    codebook = fit_codebook(beats, args.vocab_size, args.seed)
    tok = Tokenizer(codebook, tokenizer_meta(codebook.shape[0], args.seed, len(beats), args.input))
    tid = tok.save(args.output)
    print(json.dumps({"tokenizer_id": tid, "beats": len(beats), "codebook": list(codebook.shape)}))
    return 0


# ---- torch training --------------------------------------------------------------------
def load_token_rows(folders: list[str]) -> list[dict]:
    """All token rows of the given run outputs or tokens/ folders."""
    import glob
    import os

    import pyarrow.parquet as pq

    rows = []
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "tokens", "*.parquet"))) or sorted(
            glob.glob(os.path.join(folder, "*.parquet"))
        )
        for f in files:
            rows.extend(
                pq.read_table(
                    f, columns=["record_id", "start_sample", "lead_names", "tokens", "rhythm"]
                ).to_pylist()
            )
    return rows


def _batches(n: int, size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for i in range(0, n, size):
        yield order[i : i + size]


def pretrain(rows: list[dict], vocab_size: int, epochs: int, seed: int, arch: dict, log=print):
    """Masked-beat pretraining: hide 15% of beats (all leads) and predict their words."""
    import torch
    from ecgtok.models.model import EcgLM, collate, row_to_example
    from ecgtok.models.tokenizer import MASK, PAD

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EcgLM(vocab_size, **arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    examples = [row_to_example(r) for r in rows if len(r["rhythm"]) >= 2]
    for epoch in range(epochs):
        total, count = 0.0, 0
        model.train()
        for idx in _batches(len(examples), 32, rng):
            b = collate([examples[i] for i in idx])
            beat_ok = b["rhythm"] != PAD
            masked = (torch.rand(beat_ok.shape) < 0.15) & beat_ok
            if not masked.any():
                continue
            target = b["words"].clone()
            words = b["words"].clone()
            words[masked[:, None, :].expand_as(words)] = MASK
            words[target == PAD] = PAD
            logits = model.mlm_logits(words, b["rhythm"], b["leads"])  # (B, T, V)
            # Every present lead of a masked beat is a target for that beat's state.
            lead_ok = (b["leads"] >= 0)[:, :, None] & masked[:, None, :]
            lg = logits[:, None, :, :].expand(-1, words.shape[1], -1, -1)[lead_ok]
            loss = torch.nn.functional.cross_entropy(lg, target[lead_ok])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            count += len(idx)
        log(f"pretrain epoch {epoch + 1}/{epochs}: masked-word loss {total / max(count, 1):.3f}")
    return model


def finetune(model, rows: list[dict], labels: dict, heads, epochs: int, seed: int, log=print):
    """Fit the task heads (and the encoder) on labelled rows; missing labels are masked."""
    import torch
    from ecgtok.models.model import collate, row_to_example

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = []
    for r in rows:
        y = labels.get((r["record_id"], int(r["start_sample"]))) or labels.get(
            (r["record_id"], None)
        )
        if y is not None:
            data.append((row_to_example(r), y))
    if not data:
        raise SystemExit("ecgtok: error: no token row matches a label row")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in _batches(len(data), 32, rng):
            b = collate([data[i][0] for i in idx])
            y = torch.tensor(
                [[data[i][1].get(h, np.nan) for h in heads] for i in idx], dtype=torch.float32
            )
            out = model(**b)
            p = torch.stack([out[h] for h in heads], dim=1).clamp(1e-6, 1 - 1e-6)
            known = ~torch.isnan(y)
            loss = torch.nn.functional.binary_cross_entropy(p[known], y[known])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            count += len(idx)
        log(
            f"finetune epoch {epoch + 1}/{epochs}: loss {total / max(count, 1):.3f} on {len(data)} rows"
        )
    return model


def read_labels(path: str, heads) -> dict:
    """CSV of record_id [, start_sample], label columns (0/1, empty = unknown)."""
    import csv

    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            start = row.get("start_sample")
            key = (row["record_id"], int(start) if start not in (None, "") else None)
            out[key] = {h: float(row[h]) for h in heads if row.get(h) not in (None, "")}
    return out


def _train_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--tokens", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    return ap


def pretrain_main(argv: list[str]) -> int:
    from ecgtok.models.model import HEADS, save_model
    from ecgtok.pipeline.options import default_tokenizer_dir

    args = _train_parser("ecgtok pretrain").parse_args(argv)
    tok = Tokenizer.load(args.tokenizer or default_tokenizer_dir())
    rows = load_token_rows(args.tokens)
    arch = {"d_model": args.d_model, "n_layers": args.layers}
    model = pretrain(rows, tok.vocab_size, args.epochs, args.seed, arch, log=_err)
    config = {
        "arch": {"vocab_size": tok.vocab_size, **arch, "heads": list(HEADS)},
        "tokenizer_id": tok.tokenizer_id,
        "stage": "pretrained",
        "pretrain": {"rows": len(rows), "epochs": args.epochs, "seed": args.seed},
    }
    print(json.dumps({"model_id": save_model(model, config, args.output), "rows": len(rows)}))
    return 0


def finetune_main(argv: list[str]) -> int:
    from ecgtok.models.model import HEADS, load_model, save_model

    ap = _train_parser("ecgtok finetune")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--init", required=True, help="pretrained model folder")
    args = ap.parse_args(argv)
    model, config = load_model(args.init)
    rows = load_token_rows(args.tokens)
    labels = read_labels(args.labels, HEADS)
    model = finetune(model, rows, labels, HEADS, args.epochs, args.seed, log=_err)
    config = {k: v for k, v in config.items() if k != "model_id"}
    config.update(stage="finetuned", finetune={"labels": args.labels, "epochs": args.epochs})
    print(json.dumps({"model_id": save_model(model, config, args.output)}))
    return 0


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(command: str, argv: list[str]) -> int:
    return {
        "fit-tokenizer": fit_tokenizer_main,
        "pretrain": pretrain_main,
        "finetune": finetune_main,
    }[command](argv)
