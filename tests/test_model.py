"""The scoring model: artifact integrity, inputs, RunInference, and the shipped model on real AF."""

from __future__ import annotations

import copy
import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import data_path

from ecgtok.models import labels as L
from ecgtok.models.model import (
    HEADS,
    N_RR_FEATURES,
    EcgLM,
    collate,
    load_model,
    row_to_example,
    rr_features,
    save_model,
)
from ecgtok.models.tokenizer import ArtifactError, Tokenizer
from ecgtok.pipeline.flags import default_model_dir, default_tokenizer_dir


def _tiny_model(vocab: int = 40) -> tuple[EcgLM, dict]:
    torch.manual_seed(0)
    arch = {"vocab_size": vocab, "d_model": 16, "n_layers": 1, "n_heads": 2, "rr_features": 8}
    return EcgLM(**arch), {"arch": arch, "tokenizer_id": "0123456789abcdef"}


def _row(n_beats: int = 12, leads=("I", "II"), fs: float = 500.0, rr_s: float = 0.8, rng=None):
    rng = rng or np.random.default_rng(0)
    rr = np.full(n_beats - 1, rr_s) if rng is None else rr_s * (1 + 0.0 * rng.random(n_beats - 1))
    r = np.concatenate([[100], 100 + np.cumsum(rr * fs)]).astype(int)
    return {
        "record_id": "x",
        "start_sample": 0,
        "fs": fs,
        "lead_names": list(leads),
        "r_peaks": r.tolist(),
        "tokens": rng.integers(22, 40, size=(len(leads), n_beats)).tolist(),
        "rhythm": Tokenizer.rhythm_words(r, fs).tolist(),
        "tokenizer_id": "0123456789abcdef",
    }


def _assert_same_outputs(model, back) -> dict:
    """Both models give the same heads and embedding on a 12-lead and a 1-lead row."""
    b = collate([row_to_example(_row()), row_to_example(_row(7, ("V1",)))])
    model.eval()
    with torch.inference_mode():
        a, c = model(**b), back(**b)
    for h in (*HEADS, "embedding"):
        torch.testing.assert_close(a[h], c[h])
    return a


def test_save_load_round_trip_gives_same_outputs(tmp_path):
    model, config = _tiny_model()
    mid = save_model(model, config, str(tmp_path))
    back, cfg = load_model(str(tmp_path))
    assert cfg["model_id"] == mid
    _assert_same_outputs(model, back)


def test_tampered_weights_refused(tmp_path):
    model, config = _tiny_model()
    save_model(model, config, str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content check"):
        load_model(str(tmp_path))


def test_tampered_config_refused(tmp_path):
    model, config = _tiny_model()
    save_model(model, config, str(tmp_path))
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_id"] = "ffffffffffffffff"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError):
        load_model(str(tmp_path))


def test_collate_pads_leads_and_beats():
    b = collate([row_to_example(_row(12, ("I", "II", "V1"))), row_to_example(_row(5, ("II",)))])
    assert b["words"].shape == (2, 3, 12)
    assert b["rr"].shape == (2, 12, N_RR_FEATURES)
    assert (b["rhythm"][1, 5:] == 0).all() and (b["leads"][1, 1:] == -1).all()
    assert (b["rr"][1, 5:] == 0).all()


def _with_atrial(row: dict, offset: int = 40, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    shape = np.asarray(row["tokens"]).shape
    return dict(row, atrial_tokens=rng.integers(offset, offset + 10, size=shape).tolist())


def test_atrial_words_are_read_and_rows_without_them_are_unchanged():
    model, _ = _tiny_model(vocab=60)
    model.eval()
    plain = _row(12, ("I", "II"))
    a, b = _with_atrial(plain, seed=1), _with_atrial(plain, seed=2)
    ex = row_to_example(a)
    assert ex["atrial"].shape == ex["words"].shape
    batch = collate([ex, row_to_example(_row(5, ("V1",)))])  # the second has none: PAD
    assert batch["atrial"].shape == (2, 2, 12) and (batch["atrial"][1] == 0).all()
    with torch.inference_mode():
        p_a = model(**collate([row_to_example(a)]))["p_af"]
        p_b = model(**collate([row_to_example(b)]))["p_af"]
        p_plain = model(**collate([row_to_example(plain)]))["p_af"]
        p_pad = model(**batch)["p_af"][1]
        p_alone = model(**collate([row_to_example(_row(5, ("V1",)))]))["p_af"][0]
    assert not torch.allclose(p_a, p_b)  # other atrial words, another score
    assert not torch.allclose(p_a, p_plain)
    torch.testing.assert_close(p_pad, p_alone, atol=1e-5, rtol=1e-4)  # PAD atrial adds nothing


def test_slicing_beats_and_leads_keeps_every_beat_aligned_tensor():
    from ecgtok.models.model import select_leads, slice_beats

    ex = row_to_example(_with_atrial(_row(12, ("I", "II", "V1"))))
    part = select_leads(slice_beats(ex, 3, 8), [0, 2])
    assert part["words"].shape == part["atrial"].shape == (2, 5)
    assert part["rhythm"].shape == (5,) and part["rr"].shape == (5, N_RR_FEATURES)
    torch.testing.assert_close(part["atrial"], ex["atrial"][[0, 2], 3:8])
    torch.testing.assert_close(part["rr"], ex["rr"][3:8])
    assert part["leads"].tolist() == ex["leads"][[0, 2]].tolist()


def test_predict_gives_no_rhythm_score_to_rows_without_beats_and_evaluate_ranks_them_low():
    from ecgtok.models.train import never_flagged, predict

    model, _ = _tiny_model()
    empty = dict(_row(12), r_peaks=[], tokens=[[], []], rhythm=[])
    out = predict(model, [_row(12), empty])
    assert np.isfinite(out["p_af"][0]) and np.isnan(out["p_af"][1])
    assert np.isnan(out["p_other_rhythm"][1]) and np.isfinite(out["p_noisy"][1])
    assert never_flagged(out["p_af"]).tolist() == [out["p_af"][0], 0.0]


def test_rr_features_of_a_batch_are_those_of_each_row():
    """rr_features_many (padded, shared NumPy calls) against rr_features row by row, on
    real CinC 2017 token rows (9-61 s) and on edge cases: ties, constant rhythm, 1 to 140
    beats (both sides of the batched range)."""
    from ecgtok.models.model import RR_FS, RR_PEAKS, rr_features_many, with_rr_features
    from ecgtok.transforms.record_tokens import tokenize_record

    tok = Tokenizer.load(default_tokenizer_dir())
    with open(data_path("cinc2017_af", "REFERENCE.csv")) as f:
        ids = [rec for rec, _ in csv.reader(f)][:40]
    rows = [
        r for rid in ids for r in tokenize_record(data_path("cinc2017_af", rid + ".hea"), rid, tok)
    ]
    rng = np.random.default_rng(3)
    peaks, fs = [r["r_peaks"] for r in rows], [r["fs"] for r in rows]
    for t in list(range(1, 12)) + [127, 128, 129, 140]:
        rr = rng.choice([0.5, 0.8, 0.8, 1.0], size=max(t - 1, 0)) * (
            1 + rng.choice([0, 0.3], size=max(t - 1, 0))
        )
        peaks.append(np.concatenate([[0], np.cumsum(rr * 360.0)]).astype(int).tolist())
        fs.append(360.0)
    peaks.append([0, 300, 600, 900, 1200, 1500, 1800, 2100, 2400])  # strictly regular
    fs.append(300.0)
    many = rr_features_many(peaks, fs)
    for p, f, got in zip(peaks, fs, many, strict=True):
        np.testing.assert_array_equal(got, rr_features(p, f))
    # and through examples, as the model handler makes them
    exs = with_rr_features([row_to_example(r, rr=False) for r in rows[:8]])
    for r, ex in zip(rows[:8], exs, strict=True):
        assert RR_PEAKS not in ex and RR_FS not in ex
        torch.testing.assert_close(ex["rr"], row_to_example(r)["rr"])


def test_a_soup_is_the_mean_of_its_fine_tuned_runs():
    from ecgtok.models.train import average_states, finetune, finetune_once

    model, _ = _tiny_model()
    rng = np.random.default_rng(5)
    pairs = [(_row(12, rr_s=0.5 + rng.random()), {"p_af": float(i % 2)}) for i in range(16)]
    quiet = {"log": lambda *_: None, "max_beats": 12, "min_beats": 8}
    runs = [finetune_once(copy.deepcopy(model), pairs, HEADS, 3, s, **quiet) for s in (7, 8)]
    soup = finetune(copy.deepcopy(model), pairs, HEADS, 3, 7, soup=2, **quiet)
    want = average_states([r.state_dict() for r in runs])
    for key, value in soup.state_dict().items():
        torch.testing.assert_close(value, want[key])
    a, b = (r.state_dict()["task.weight"] for r in runs)
    assert not torch.equal(a, b)  # two seeds, two different runs


def test_flip_single_lead_averages_single_lead_rows_with_their_inverted_words(tmp_path):
    """With `flip_single_lead`, a 1-lead row scores as the mean of its reading and its
    reading through the inversion map; multi-lead rows are untouched; the map and the
    setting survive save and load."""
    from ecgtok.models.train import _maybe_flip

    model, config = _tiny_model()
    plain = collate([row_to_example(_row()), row_to_example(_row(7, ("V1",)))])
    model.eval()
    with torch.inference_mode():
        before = model(**plain)
    inv = np.arange(40)
    inv[22:40] = inv[22:40][::-1]  # any map of the word ids
    model.enable_flip(inv)
    config = {**config, "arch": {**config["arch"], "flip_single_lead": True}}
    flipped = dict(plain, words=torch.as_tensor(inv)[plain["words"]])
    with torch.inference_mode():
        after = model(**plain)
        model.flip_single_lead = False
        inverted = model(**flipped)
        model.flip_single_lead = True
    for h in (*HEADS, "embedding"):
        torch.testing.assert_close(after[h][0], before[h][0])  # 2 leads: as before
        torch.testing.assert_close(after[h][1], (before[h][1] + inverted[h][1]) / 2)
    assert not torch.allclose(after["p_af"][1], before["p_af"][1])
    save_model(model, config, str(tmp_path))
    back, cfg = load_model(str(tmp_path))
    assert cfg["arch"]["flip_single_lead"] and back.flip_single_lead
    _assert_same_outputs(model, back)
    # training: single-lead crops are flipped about half the time, multi-lead never
    rng = np.random.default_rng(0)
    one, two = row_to_example(_row(7, ("V1",))), row_to_example(_row())
    flips = [
        not torch.equal(_maybe_flip(one, rng, model.flip_ids)["words"], one["words"])
        for _ in range(200)
    ]
    assert 0.35 < np.mean(flips) < 0.65
    assert all(_maybe_flip(two, rng, model.flip_ids) is two for _ in range(20))


def test_evaluation_subgroups_by_sex_and_age_where_known():
    from ecgtok.models.train import subgroups

    rows = [{"sex": "Female", "age": 70.0}, {"sex": "M", "age": 40.0}, {"sex": None, "age": None}]
    g = subgroups(rows)
    assert g["sex=F"].tolist() == [True, False, False]
    assert g["sex=M"].tolist() == [False, True, False]
    assert g["age>=65"].tolist() == [True, False, False]
    assert g["age<65"].tolist() == [False, True, False]
    assert subgroups([{"sex": None, "age": None}]) == {}  # nothing known: no groups


def test_padding_does_not_change_a_records_scores():
    model, _ = _tiny_model()
    model.eval()
    a = row_to_example(_row(12))
    with torch.inference_mode():
        alone = model(**collate([a]))["p_af"][0]
        padded = model(**collate([a, row_to_example(_row(30, ("I", "II", "III")))]))["p_af"][0]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_rr_features_see_irregularity():
    fs = 300.0
    rng = np.random.default_rng(1)
    regular = np.cumsum(np.full(40, 0.8 * fs)).astype(int)
    irregular = np.cumsum(rng.uniform(0.4, 1.2, 40) * fs).astype(int)
    fr, fi = rr_features(regular, fs), rr_features(irregular, fs)
    assert fr.shape == (40, N_RR_FEATURES)
    assert abs(fr[:, 3]).max() < 1e-6 and fi[:, 3].mean() > 0.5
    # Rate-independent: the same beats at another sampling rate give the same features.
    np.testing.assert_allclose(rr_features(regular * 2, 2 * fs), fr, atol=1e-5)
    assert rr_features([5], fs).shape == (1, N_RR_FEATURES)
    assert np.isfinite(rr_features(regular[:3], fs)).all()
    # Row-level statistics (successive-change rates, COSEn, sample entropy, ...): higher
    # for the irregular row; the share of RRs near the median lower.
    for i in (8, 9, 10, 12, 13, 14, 18):
        assert fi[:, i].mean() > fr[:, i].mean(), i
    assert fi[:, 16].mean() < fr[:, 16].mean()
    # Long rows get per-block statistics, at a cost linear in the beats.
    long = np.cumsum(rng.uniform(0.4, 1.2, 2000) * fs).astype(int)
    fl = rr_features(long, fs)
    assert fl.shape == (2000, N_RR_FEATURES) and np.isfinite(fl).all()


def test_models_with_fewer_rr_features_still_load_and_score(tmp_path):
    model, config = _tiny_model()  # reads the first 8 features, like the older models
    save_model(model, config, str(tmp_path))
    back, _ = load_model(str(tmp_path))
    b = collate([row_to_example(_row())])
    assert b["rr"].shape[-1] == N_RR_FEATURES
    with torch.inference_mode():
        assert torch.isfinite(back(**b)["p_af"]).all()


def test_word_shapes_meanmax_and_rr_head_round_trip(tmp_path):
    from ecgtok.models.train import set_pool

    torch.manual_seed(0)
    vocab = 40
    arch = {
        "vocab_size": vocab,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "rr_features": N_RR_FEATURES,
        "shape_dim": 96,
    }
    model = EcgLM(**arch)
    shapes = np.zeros((vocab, 96), dtype=np.float32)
    shapes[22:] = np.random.default_rng(0).normal(size=(vocab - 22, 96))
    model.set_word_shapes(shapes)
    model, config = set_pool(
        model, {"arch": arch, "tokenizer_id": "0123456789abcdef"}, "meanmax", 8
    )
    assert config["arch"]["pool"] == "meanmax" and config["arch"]["rr_head"] == 8
    save_model(model, config, str(tmp_path))
    back, _ = load_model(str(tmp_path))
    torch.testing.assert_close(back.shapes, model.shapes)
    a = _assert_same_outputs(model, back)
    assert a["embedding"].shape == (2, 16)
    # Padding must not change a record's scores with max pooling either.
    with torch.inference_mode():
        alone = back(**collate([row_to_example(_row(7, ("V1",)))]))["p_af"][0]
    torch.testing.assert_close(alone, a["p_af"][1], atol=1e-5, rtol=1e-4)


def test_handler_refuses_rows_of_another_tokenizer():
    from ecgtok.models.handler import check_tokenizer

    ex = row_to_example(_row())
    check_tokenizer([ex], "0123456789abcdef")
    with pytest.raises(ArtifactError, match="tokenizer"):
        check_tokenizer([ex], "fedcba9876543210")


# ---- labels ----------------------------------------------------------------------------------
def test_label_builders_on_shared_data(tmp_path):
    root = os.path.dirname(data_path("mitdb", "201.hea"))
    rows = L.build_labels(os.path.dirname(root))
    by = {(r["source"], r["record_id"], r["start_sample"]): r for r in rows}
    with open(data_path("cinc2017_af", "REFERENCE.csv")) as f:
        ref = dict(csv.reader(f))
    for rec, lab in list(ref.items())[:50]:
        r = by[("cinc2017", rec, "")]
        assert r["p_af"] == float(lab == "A") and r["p_noisy"] == float(lab == "~")
    # MIT-BIH 201 starts in AF; 100 never has AF; every segment of a record in one split.
    assert by[("mitdb", "201", 0)]["p_af"] > 0.9
    assert all(r["p_af"] == 0 for r in rows if r["source"] == "mitdb" and r["record_id"] == "100")
    splits = {}
    for r in rows:
        splits.setdefault((r["source"], r["record_id"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    n_test = sum(s == {"test"} for s in splits.values())
    assert 0.1 < n_test / len(splits) < 0.3
    af21 = [r for r in rows if r["source"] == "cinc2021" and r["p_af"] == 1.0]
    assert len(af21) >= 5
    out = tmp_path / "labels.csv"
    L.write_labels(rows, str(out))
    from ecgtok.models.train import read_labels

    assert len(read_labels(str(out), HEADS, "test")) == sum(r["split"] == "test" for r in rows)


# ---- the shipped model -------------------------------------------------------------------------
def _test_split_cinc2017(n: int):
    """The first n AF and n normal CinC 2017 records of the label 'test' split."""
    with open(data_path("cinc2017_af", "REFERENCE.csv")) as f:
        ref = list(csv.reader(f))
    af = [r for r, lab in ref if lab == "A" and L.split_of("cinc2017", r) == "test"][:n]
    normal = [r for r, lab in ref if lab == "N" and L.split_of("cinc2017", r) == "test"][:n]
    return af, normal


def _score_records(names, model, tok):
    from ecgtok.transforms.record_tokens import tokenize_record

    rows = []
    for name in names:
        rows += tokenize_record(data_path("cinc2017_af", name + ".hea"), name, tok)
    with torch.inference_mode():
        return model(**collate([row_to_example(r) for r in rows]))["p_af"].numpy()


@pytest.mark.slow
def test_shipped_model_scores_a_lead_recorded_upside_down_as_it_scores_the_lead(tmp_path):
    """Held-out CinC 2017 records written again with the lead negated (the AliveCor held
    the other way): each p_af stays close to the original's (measured: at most 0.23 apart
    with the flip, median 0.007; 0.90 without it), and AF still ranks above normal."""
    import wfdb
    from sklearn.metrics import roc_auc_score

    from ecgtok.transforms.record_tokens import tokenize_record

    model, cfg = load_model(default_model_dir())
    assert cfg["arch"].get("flip_single_lead")
    tok = Tokenizer.load(default_tokenizer_dir())
    af, normal = _test_split_cinc2017(8)
    rows, negated = [], []
    for name in af + normal:
        path = data_path("cinc2017_af", name + ".hea")
        rec = wfdb.rdrecord(path[: -len(".hea")])
        wfdb.wrsamp(
            name,
            fs=rec.fs,
            units=rec.units,
            sig_name=rec.sig_name,
            p_signal=-rec.p_signal,
            fmt=["16"],
            adc_gain=[1000.0],
            baseline=[0],
            write_dir=str(tmp_path),
        )
        rows += tokenize_record(path, name, tok)
        negated += tokenize_record(str(tmp_path / f"{name}.hea"), name, tok)
    model.eval()
    with torch.inference_mode():
        p = model(**collate([row_to_example(r) for r in rows]))["p_af"].numpy()
        p_neg = model(**collate([row_to_example(r) for r in negated]))["p_af"].numpy()
    assert np.abs(p - p_neg).max() < 0.25
    y = [1] * len(af) + [0] * len(normal)
    assert roc_auc_score(y, p_neg) >= 0.9


def test_shipped_model_matches_shipped_tokenizer():
    _, cfg = load_model(default_model_dir())
    assert cfg["tokenizer_id"] == Tokenizer.load(default_tokenizer_dir()).tokenizer_id
    assert cfg["stage"] == "finetuned" and cfg["finetune"]["split"] == "train"
    assert 0 < cfg["p_af_threshold"] < 1


def test_shipped_cards_name_the_shipped_artifacts():
    """The cards describe the files beside them: a refit that forgets its card fails here."""
    _, cfg = load_model(default_model_dir())
    with open(os.path.join(default_model_dir(), "CARD.md")) as f:
        card = f.read()
    assert cfg["model_id"] in card.splitlines()[0]
    assert cfg["tokenizer_id"] in card
    assert f"{cfg['p_af_threshold']}" in card
    with open(os.path.join(default_tokenizer_dir(), "CARD.md")) as f:
        assert cfg["tokenizer_id"] in f.read()


def test_shipped_model_scores_af_above_normal_on_unseen_records():
    """CinC 2017 records of the test split (never fine-tuned on): AF scores above normal."""
    from sklearn.metrics import roc_auc_score

    af, normal = _test_split_cinc2017(12)
    assert len(af) >= 8 and len(normal) >= 8
    model, _ = load_model(default_model_dir())
    tok = Tokenizer.load(default_tokenizer_dir())
    p_af, p_n = _score_records(af, model, tok), _score_records(normal, model, tok)
    assert np.median(p_af) > np.median(p_n)
    y = np.r_[np.ones(len(p_af)), np.zeros(len(p_n))]
    assert roc_auc_score(y, np.r_[p_af, p_n]) >= 0.85


@pytest.mark.slow
def test_run_inference_through_the_handler_matches_plain_torch():
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.testing.util import assert_that

    from ecgtok.models.handler import EcgModelHandler
    from ecgtok.transforms.record_tokens import tokenize_record

    tok = Tokenizer.load(default_tokenizer_dir())
    rows = []
    for name in ("A00001", "A00004", "A00005"):
        rows += tokenize_record(data_path("cinc2017_af", name + ".hea"), name, tok)
    model, cfg = load_model(default_model_dir())
    from ecgtok.models.train import predict

    # The evaluation command's scores (its p_af windows included) are the job's.
    want = dict(zip([r["record_id"] for r in rows], predict(model, rows)["p_af"], strict=True))

    def check(results):
        got = {k: float(res.inference["p_af"]) for k, res in results}
        assert got.keys() == want.keys()
        for k in want:
            assert abs(got[k] - want[k]) < 1e-5
        assert {res.model_id for _, res in results} == {cfg["model_id"]}
        assert all(len(res.inference["embedding"]) == cfg["arch"]["d_model"] for _, res in results)

    handler = KeyedModelHandler(EcgModelHandler(default_model_dir(), "cpu", max_batch_size=2))
    with beam.Pipeline() as p:
        out = (
            p
            # as ScoreRecords makes them: RR features made by the handler, per batch
            | beam.Create([(r["record_id"], row_to_example(r, rr=False)) for r in rows])
            | RunInference(handler)
        )
        assert_that(out, check)


def test_p_af_of_a_strip_is_the_mean_over_its_runs_of_beats(tmp_path):
    from ecgtok.models.burden import LONG_ROW_BEATS, windowed_p_af
    from ecgtok.models.model import slice_beats
    from ecgtok.models.train import predict, set_p_af_window

    model, config = _tiny_model()
    model.eval()
    rng = np.random.default_rng(3)
    rows = [_row(n, rng=rng) for n in (10, 24, 25, 60, LONG_ROW_BEATS, LONG_ROW_BEATS + 1)]
    whole = predict(model, rows)["p_af"]
    assert windowed_p_af(model, [row_to_example(r) for r in rows]) == {}  # off by default

    model, config = set_p_af_window(model, config, 24)
    got = predict(model, rows)["p_af"]
    with torch.inference_mode():
        for row, w, g in zip(rows, whole, got, strict=True):
            ex, t = row_to_example(row), len(row["rhythm"])
            if t <= 24 or t > LONG_ROW_BEATS:  # short rows and long rows: the whole row
                assert g == pytest.approx(w, abs=1e-6)
                continue
            starts = list(range(0, t - 24 + 1, 12))
            starts += [t - 24] if starts[-1] != t - 24 else []
            runs = [
                float(model(**collate([slice_beats(ex, s, s + 24)]))["p_af"][0]) for s in starts
            ]
            assert g == pytest.approx(np.mean(runs), abs=1e-5), t
            assert g != pytest.approx(w, abs=1e-4)
    # The setting travels with the artifact.
    save_model(model, config, str(tmp_path))
    back, back_config = load_model(str(tmp_path))
    assert back.p_af_window == 24 and back_config["arch"]["p_af_window"] == 24
    np.testing.assert_allclose(predict(back, rows)["p_af"], got, atol=1e-6)


def test_model_tokenizer_check_names_both_ids():
    from ecgtok.models.model import check_model_tokenizer

    cfg = {"model_id": "m1", "tokenizer_id": "0123456789abcdef"}
    check_model_tokenizer(cfg, "0123456789abcdef")
    with pytest.raises(ArtifactError, match="0123456789abcdef.*fedcba9876543210"):
        check_model_tokenizer(cfg, "fedcba9876543210")


def test_af_burden_from_window_scores():
    from ecgtok.models.burden import af_burden

    fs = 100.0
    r = np.arange(0, 600 * fs, 100).astype(int)  # 600 beats, 1 per second
    row = {"r_peaks": r.tolist(), "fs": fs}
    # Beats 100-399 in AF (300 s), the rest not; one short blip at 500-509 (10 s).
    windows = [(0, 100, 0.01), (100, 400, 0.9), (400, 500, 0.02), (500, 510, 0.9)]
    windows += [(510, 600, 0.0)]
    out = af_burden(row, windows, threshold=0.5, min_episode_s=30.0)
    assert out["af_episodes"] == [(int(r[100]), int(r[399]))]
    assert abs(out["af_burden"] - 299 / 599) < 1e-3
    assert af_burden(row, windows, threshold=0.95)["af_burden"] == 0.0


@pytest.mark.slow
def test_shipped_model_af_burden_on_mitdb():
    """Held-out MIT-BIH 210 (AF almost throughout) vs held-out 117 (sinus rhythm)."""
    from ecgtok.models.burden import af_burden, score_windows
    from ecgtok.transforms.record_tokens import tokenize_record

    model, cfg = load_model(default_model_dir())
    tok = Tokenizer.load(default_tokenizer_dir())
    burden = {}
    for name in ("210", "117"):
        row = tokenize_record(data_path("mitdb", name + ".hea"), name, tok)[0]
        burden[name] = af_burden(row, score_windows(model, row), 0.5)["af_burden"]
    assert burden["210"] > 0.7 and burden["117"] < 0.1


@pytest.mark.slow
def test_shipped_model_on_held_out_holter_windows_at_another_devices_rate(tmp_path):
    """The test-split MIT-BIH records (never fine-tuned on) as 30 s windows, resampled
    from 360 to 128 Hz and written as new WFDB records, as another Holter would store
    them: AF windows still rank high (0.951-0.953 measured at 360, 250 and 128 Hz), above
    the RR-irregularity baseline on the same windows."""
    import wfdb
    from scipy.signal import resample_poly
    from sklearn.metrics import roc_auc_score

    from ecgtok.models.train import never_flagged, predict
    from ecgtok.transforms.record_tokens import tokenize_record

    labels = {
        (r["record_id"], int(r["start_sample"])): float(r["p_af"])
        for r in L.mitdb_labels(data_path("mitdb"), 30.0)
        if r["split"] == "test"
    }
    names = sorted({name for name, _ in labels})
    assert len(names) >= 8
    model, _ = load_model(default_model_dir())
    tok = Tokenizer.load(default_tokenizer_dir())
    rows, y, rr_change = [], [], []
    for name in names:
        rec = wfdb.rdrecord(os.path.join(data_path("mitdb"), name))
        sig = resample_poly(rec.p_signal, 128, 360, axis=0)
        n_sig = sig.shape[1]
        wfdb.wrsamp(
            name,
            fs=128,
            units=rec.units,
            sig_name=rec.sig_name,
            p_signal=sig,
            fmt=["16"] * n_sig,
            adc_gain=[200.0] * n_sig,
            baseline=[0] * n_sig,
            write_dir=str(tmp_path),
        )
        for row in tokenize_record(str(tmp_path / f"{name}.hea"), name, tok, 30.0):
            key = (name, int(round(row["start_sample"] / 128 * 360)))
            if key in labels:
                rows.append(row)
                y.append(labels[key] >= 0.5)
                lrr = np.log(np.clip(np.diff(row["r_peaks"]) / 128, 0.15, 3.0))
                rr_change.append(np.mean(np.abs(np.diff(lrr)) > 0.1) if lrr.size > 1 else 0)
    assert len(rows) >= 0.95 * len(labels) and 50 <= sum(y) < len(y)
    auroc = roc_auc_score(y, never_flagged(predict(model, rows)["p_af"]))
    assert auroc >= 0.92
    assert auroc > roc_auc_score(y, rr_change) + 0.05


@pytest.mark.slow
def test_burden_covers_a_long_row_beyond_the_models_512_beats():
    """MIT-BIH 210 (AF throughout) as one row of ~2,600 beats: the main example
    keeps 512 beats, but the burden and episodes cover the whole row."""
    from ecgtok.models.burden import burden_of_examples, mark_for_burden
    from ecgtok.models.model import MAX_BEATS, row_to_example
    from ecgtok.transforms.record_tokens import tokenize_record

    model, cfg = load_model(default_model_dir())
    tok = Tokenizer.load(default_tokenizer_dir())
    (row,) = tokenize_record(data_path("mitdb", "210.hea"), "210", tok, segment_s=2000.0)
    n = len(row["r_peaks"])
    assert n > 4 * MAX_BEATS
    ex = mark_for_burden(row_to_example(row), row)
    assert ex["rhythm"].shape[0] == MAX_BEATS and ex["burden_rhythm"].shape[0] == n
    (out,) = burden_of_examples(model, [ex], cfg["p_af_threshold"]).values()
    assert out["af_burden"] > 0.7
    assert out["af_episodes"][-1][1] > row["r_peaks"][3 * MAX_BEATS]


def test_record_errors_cross_process_boundaries_intact():
    import pickle

    from ecgtok.transforms.errors import RecordError

    err = pickle.loads(pickle.dumps(RecordError("read", "truncated", "signal file too short")))
    assert (err.stage, err.error_type, err.message) == (
        "read",
        "truncated",
        "signal file too short",
    )


@pytest.mark.slow
def test_training_commands_end_to_end_on_a_small_real_set(tmp_path, capsys):
    """pretrain -> evaluate (2 folds) -> finetune on 48 CinC 2017 records: each command
    runs, writes what it says, and the fine-tuned model loads and refuses nothing."""
    import csv
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgtok.models.train import main as train
    from ecgtok.transforms.record_tokens import tokenize_record
    from ecgtok.transforms.schemas import token_schema

    tok = Tokenizer.load(default_tokenizer_dir())
    with open(data_path("cinc2017_af", "REFERENCE.csv")) as f:
        ref = [r for r in csv.reader(f)][:48]
    rows = []
    for rid, _ in ref:
        rows += tokenize_record(data_path("cinc2017_af", rid + ".hea"), rid, tok)
    shards = tmp_path / "tokens"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=token_schema()), shards / "part.parquet")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["record_id", "p_af", "p_noisy", "p_other_rhythm", "source", "split"])
        for i, (rid, lab) in enumerate(ref):
            split = "train" if i % 4 == 0 else "test"
            heads = [int(lab == "A"), int(lab == "~"), int(lab == "O")]
            w.writerow([rid, *heads, "cinc2017", split])
    common = ["--tokens", str(shards)]
    assert train("pretrain", [*common, "--output", str(tmp_path / "pre"), "--epochs", "1"]) == 0
    capsys.readouterr()
    args = [*common, "--labels", str(labels), "--init", str(tmp_path / "pre")]
    assert train("evaluate", [*args, "--folds", "2", "--epochs", "1", "--flip-single-lead"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "cross-validation" and report["metrics"]["cinc2017"]["p_af"]["n"] == 48
    out = tmp_path / "model"
    flags = ["--epochs", "1", "--split", "train", "--flip-single-lead"]
    assert train("finetune", [*args, "--output", str(out), *flags]) == 0
    model, cfg = load_model(str(out))
    assert cfg["tokenizer_id"] == tok.tokenizer_id and cfg["finetune"]["rows"] == 12
    assert cfg["arch"]["flip_single_lead"]
    np.testing.assert_array_equal(model.flip_ids.numpy(), tok.inversion_map())
    # pretraining can read single-lead crops upside down too; the map travels with it
    pre = tmp_path / "pre_flip"
    assert (
        train("pretrain", [*common, "--output", str(pre), "--epochs", "1", "--flip-single-lead"])
        == 0
    )
    model, cfg = load_model(str(pre))
    assert cfg["arch"]["flip_single_lead"]
    np.testing.assert_array_equal(model.flip_ids.numpy(), tok.inversion_map())
