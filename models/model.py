"""The scoring model: a small transformer encoder over a record's heartbeat sentence.

Input per record (one token row): morphology words per lead and beat, atrial words per
lead and beat (tokenizers that have them), one rhythm word per beat, and the lead of each
row. Each beat becomes one vector: the mean over its leads of (morphology word embedding +
atrial word embedding + lead embedding), plus its rhythm word's embedding and its
position. A transformer encoder reads the beat vectors; a masked mean gives the record's
`embedding`; small heads give the probabilities. Fusing the leads per beat keeps the
sequence as long as the beat count (not leads × beats), which keeps CPU scoring fast.

Pretraining predicts the words of masked beats (every lead) from their context.

Artifact: `model.safetensors` + `config.json`; `model_id` is a hash of both, checked on
load. Nothing is ever unpickled.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from ecgtok.models.tokenizer import PAD, ArtifactError, _join, _read_bytes, content_hash
from ecgtok.transforms.leads import VOCABULARY

N_LEAD_IDS = len(VOCABULARY) + 1
HEADS = ("p_af", "p_noisy", "p_other_rhythm")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_BEATS = 512
N_RR_FEATURES = 22
RHYTHM_BLOCK = 128  # beats per block for the row-level rhythm statistics
# Rows of fewer beats get no rhythm scores (null): with no RR interval to read, the model
# only sees padding, and its rhythm scores would be noise (about 0.5, over any threshold).
MIN_BEATS_FOR_RHYTHM = 2
RHYTHM_HEADS = ("p_af", "p_other_rhythm")


class EcgLM(nn.Module):
    """Beat-level transformer encoder with pretraining and task heads."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_beats: int = MAX_BEATS,
        heads: tuple[str, ...] = HEADS,
        dropout: float = 0.1,
        rr_features: int = 0,
        shape_dim: int = 0,
        pool: str = "mean",
        rr_head: int = 0,
        p_af_window: int = 0,
        flip_single_lead: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # Single-lead rows are scored as they are and with every word replaced by its
        # polarity-inverted word (`flip_ids`, Tokenizer.inversion_map), and the two
        # averaged: a handheld single-lead device held the other way records the lead
        # upside down (about 23% of CinC 2017's AliveCor recordings have negative R waves).
        # Training (fine-tuning, and pretraining with the flag) flips single-lead crops half
        # the time, so both readings are familiar.
        self.flip_single_lead = bool(flip_single_lead)
        if self.flip_single_lead:
            self.register_buffer("flip_ids", torch.arange(vocab_size))
        # > 0: a row's p_af is the mean over its runs of this many beats (see
        # models.burden.windowed_p_af); 0: the whole row, as forward() scores it.
        self.p_af_window = int(p_af_window)
        self.heads = tuple(heads)
        self.word = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.lead = nn.Embedding(N_LEAD_IDS, d_model)
        self.rhythm = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_beats, d_model)
        # Optional: each morphology word also gets a linear map of its codebook centroid
        # (the beat waveform it stands for), so words of similar shape share what they learn.
        self.shape_dim = int(shape_dim)
        self._word_table = None  # (key, table) cached for scoring (see word_vectors)
        if self.shape_dim:
            self.register_buffer("shapes", torch.zeros(vocab_size, self.shape_dim))
            self.shape_proj = nn.Linear(self.shape_dim, d_model, bias=False)
        # Exact RR intervals (not only their bins): irregularity is AF's first sign.
        self.rr_features = int(rr_features)
        self.rr = nn.Linear(self.rr_features, d_model) if self.rr_features else None
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.mlm = nn.Linear(d_model, vocab_size)
        # "meanmax": the heads read the masked mean and the masked max of the beat states,
        # so a short episode (paroxysmal AF in a long recording) is not averaged away.
        if pool not in ("mean", "meanmax"):
            raise ValueError(f"pool must be 'mean' or 'meanmax', not {pool!r}")
        self.pool = pool
        # rr_head > 0: the heads also read a small MLP of the beats' mean RR features (the
        # row's rhythm statistics), a direct nonlinear path beside the encoder.
        self.rr_head = int(rr_head) if self.rr_features else 0
        self.rr_mlp = (
            nn.Sequential(nn.Linear(self.rr_features, self.rr_head), nn.GELU())
            if self.rr_head
            else None
        )
        self.task = nn.Linear(self.head_inputs(d_model), len(self.heads))

    def head_inputs(self, d_model: int) -> int:
        """Width of what the task heads read."""
        return d_model * (2 if self.pool == "meanmax" else 1) + self.rr_head

    def encode(
        self,
        words: torch.Tensor,
        rhythm: torch.Tensor,
        leads: torch.Tensor,
        rr: torch.Tensor | None = None,
        atrial: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """words (B, L, T), rhythm (B, T), leads (B, L), rr (B, T, F), atrial (B, L, T) ->
        states (B, T, D), mask. Atrial words share the word table (their ids follow the
        morphology words'); PAD atrial words (rows without them) add nothing."""
        lead_present = (leads >= 0).float()  # (B, L)
        x = self.word_vectors(words) + self.lead(leads.clamp(min=0))[:, :, None, :]
        if atrial is not None:
            x = x + self.word_vectors(atrial)
        x = (x * lead_present[:, :, None, None]).sum(1) / lead_present.sum(1).clamp(min=1)[
            :, None, None
        ]
        beat_mask = rhythm != PAD  # (B, T)
        t = torch.arange(words.shape[-1], device=words.device).clamp(
            max=self.pos.num_embeddings - 1
        )
        x = x + self.rhythm(rhythm) + self.pos(t)[None]
        if self.rr is not None:
            if rr is None:
                rr = torch.zeros(rhythm.shape + (self.rr_features,), device=words.device)
            x = x + self.rr(rr[..., : self.rr_features])  # older models read fewer
        # A record with no beats would mask every position, and attention over nothing is
        # NaN; let it attend to its (empty) first position so it still gets a finite score.
        attend = beat_mask.clone()
        attend[:, 0] |= ~beat_mask.any(dim=1)
        h = self.encoder(x, src_key_padding_mask=~attend)
        return self.norm(h), beat_mask

    def word_vectors(self, words: torch.Tensor) -> torch.Tensor:
        """Morphology-word embeddings (+ the projected centroid waveform when enabled)."""
        if not self.shape_dim:
            return self.word(words)
        if self.training or torch.is_grad_enabled():
            table = self.word.weight + self.shape_proj(self.shapes)
        else:
            # Scoring: the (vocab, d) table is the same for every batch. Made once, it
            # saves a 4,118 x 96 x 64 product per call (most of a one-row forward pass).
            # Rebuilt whenever its inputs change: in place (load_state_dict, an optimizer
            # step) bumps a tensor's _version; .to() or .half() gives new tensors.
            parts = (self.word.weight, self.shape_proj.weight, self.shapes)
            key = tuple((id(t), t._version, t.device, t.dtype) for t in parts)
            cached = self._word_table
            if cached is None or cached[0] != key:
                cached = self._word_table = (key, parts[0] + self.shape_proj(parts[2]))
            table = cached[1]
        return nn.functional.embedding(words, table, padding_idx=PAD)

    def set_word_shapes(self, shapes: np.ndarray) -> None:
        """Store the centroid waveform of every word (rows of zeros for non-morphology ids)."""
        s = torch.as_tensor(np.asarray(shapes, dtype=np.float32))
        self.shapes.copy_(s / s.std().clamp(min=1e-6))

    def enable_flip(self, inversion: np.ndarray) -> None:
        """Turn on `flip_single_lead` with this polarity-inversion word map
        (Tokenizer.inversion_map)."""
        ids = torch.as_tensor(np.asarray(inversion, dtype=np.int64))
        if not self.flip_single_lead:
            self.flip_single_lead = True
            self.register_buffer("flip_ids", torch.arange(self.vocab_size))
        self.flip_ids.copy_(ids)

    def forward(
        self,
        words: torch.Tensor,
        rhythm: torch.Tensor,
        leads: torch.Tensor,
        rr: torch.Tensor | None = None,
        atrial: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = self._heads(words, rhythm, leads, rr, atrial)
        if self.flip_single_lead and not self.training:
            out = self._average_with_flipped(out, words, rhythm, leads, rr, atrial)
        return out

    def _average_with_flipped(self, out, words, rhythm, leads, rr, atrial):
        """`out` with its single-lead rows averaged with their polarity-inverted reading."""
        single = ((leads >= 0).sum(1) == 1).nonzero().squeeze(1)
        if single.numel() == 0:
            return out
        f = self.flip_ids
        flipped = self._heads(
            f[words[single]],
            rhythm[single],
            leads[single],
            None if rr is None else rr[single],
            None if atrial is None else f[atrial[single]],
        )
        averaged = {}
        for key, value in out.items():
            value = value.clone()
            value[single] = (value[single] + flipped[key]) / 2
            averaged[key] = value
        return averaged

    def _heads(self, words, rhythm, leads, rr=None, atrial=None) -> dict[str, torch.Tensor]:
        h, mask = self.encode(words, rhythm, leads, rr, atrial)
        m = mask.float()[:, :, None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        feats = pooled
        if self.pool == "meanmax":
            hmax = h.masked_fill(~mask[:, :, None], float("-inf")).amax(1)
            hmax = torch.where(mask.any(1)[:, None], hmax, torch.zeros_like(hmax))
            feats = torch.cat([pooled, hmax], dim=1)
        if self.rr_mlp is not None:
            if rr is None:
                rr = torch.zeros(rhythm.shape + (self.rr_features,), device=words.device)
            rr_mean = (rr[..., : self.rr_features] * m).sum(1) / m.sum(1).clamp(min=1.0)
            feats = torch.cat([feats, self.rr_mlp(rr_mean)], dim=1)
        probs = torch.sigmoid(self.task(feats))
        out = {name: probs[:, i] for i, name in enumerate(self.heads)}
        out["embedding"] = pooled
        return out

    def mlm_logits(self, words, rhythm, leads, rr=None, atrial=None) -> torch.Tensor:
        """Per-beat word logits (B, T, V) for masked-beat pretraining."""
        h, _ = self.encode(words, rhythm, leads, rr, atrial)
        return self.mlm(h)


# ---- turning token rows into tensors ---------------------------------------------------
def rr_features(r_peaks, fs: float) -> np.ndarray:
    """Per-beat RR features (T, N_RR_FEATURES) from R-peak samples at rate `fs`.

    log RR before and after the beat, both relative to the record's median RR, the log
    ratio of successive RRs, a local irregularity (mean |successive log ratio| over 9
    beats) and the record's irregularity (median of the same), and how often successive
    RRs change by more than 10% (over 9 beats, and over the row). Units cancel, so the
    rate of the recording does not matter. Missing intervals (first/last beat) are 0.
    """
    r = np.asarray(r_peaks, dtype=np.float64)
    t = r.size
    out = np.zeros((t, N_RR_FEATURES), dtype=np.float32)
    if t < 2 or not fs:
        return out
    rr = np.clip(np.diff(r) / float(fs), 0.15, 3.0)
    lrr = np.log(rr)
    med = np.median(lrr)
    prev = np.full(t, np.nan)
    nxt = np.full(t, np.nan)
    prev[1:] = lrr
    nxt[:-1] = lrr
    ratio = np.full(t, np.nan)
    ratio[1:-1] = np.diff(lrr)
    absr = np.abs(np.nan_to_num(ratio))
    valid = (~np.isnan(ratio)).astype(np.float64)
    local = _window_sum(absr, 4) / np.maximum(_window_sum(valid, 4), 1.0)
    glob = np.median(np.abs(np.diff(lrr))) if lrr.size > 1 else 0.0
    out[:, 0] = np.nan_to_num(prev - med)
    out[:, 1] = np.nan_to_num(nxt - med)
    out[:, 2] = np.nan_to_num(ratio)
    out[:, 3] = local * 4.0
    out[:, 4] = glob * 4.0
    out[:, 5] = med
    # Robust to single ectopic beats: how often successive RRs change by more than 10%.
    big = (absr > 0.1).astype(np.float64) * valid
    out[:, 6] = _window_sum(big, 4) / np.maximum(_window_sum(valid, 4), 1.0)
    out[:, 7] = big.sum() / max(valid.sum(), 1.0)
    if N_RR_FEATURES > 8:
        small = (absr > 0.04).astype(np.float64) * valid
        out[:, 21] = _window_sum(small, 4) / np.maximum(_window_sum(valid, 4), 1.0)
        # Row-level rhythm statistics, per block of up to RHYTHM_BLOCK beats (a whole short
        # recording; local summaries of a long one, so the cost stays linear).
        n_blocks = max(1, int(np.ceil(t / RHYTHM_BLOCK)))
        for idx in np.array_split(np.arange(t), n_blocks):
            lo, hi = int(idx[0]), int(idx[-1])
            out[lo : hi + 1, 8:21] = _rhythm_stats(lrr[lo:hi])
    return out


def _sample_entropy(x: np.ndarray, r: float, m: int = 1) -> float:
    """Sample entropy (template length m, tolerance r), smoothed so short rows stay finite."""
    n = x.size
    if n < m + 2:
        return 0.0
    e_m = np.lib.stride_tricks.sliding_window_view(x, m)[: n - m]
    e_m1 = np.lib.stride_tricks.sliding_window_view(x, m + 1)
    b = (np.abs(e_m[:, None, :] - e_m[None, :, :]).max(-1) <= r).sum() - e_m.shape[0]
    a = (np.abs(e_m1[:, None, :] - e_m1[None, :, :]).max(-1) <= r).sum() - e_m1.shape[0]
    return float(-np.log((a + 1.0) / (b + 1.0)))


def _rhythm_stats(lrr: np.ndarray) -> np.ndarray:
    """13 irregularity statistics of a run of log RR intervals (s), each of order 1.

    Successive-difference rates at 2/4/6/20%, the coefficient of sample entropy (COSEn,
    r = 30 ms) and the sample entropy of log RR, the 6% rate with ectopic short-long pairs
    left out and the fraction of such pairs, the fraction of RRs within 5% and 10% of the
    median, the RR histogram's entropy, the turning-point ratio and the spread (MAD).
    """
    out = np.zeros(13, dtype=np.float64)
    if lrr.size < 3:
        return out
    d = np.diff(lrr)
    a = np.abs(d)
    med = np.median(lrr)
    for i, thr in enumerate((0.02, 0.04, 0.06, 0.2)):
        out[i] = (a > thr).mean()
    rr = np.exp(lrr)
    se = _sample_entropy(rr, 0.03)
    out[4] = (se + np.log(0.06) - np.log(rr.mean()) + 1.0) / 2.0
    out[5] = _sample_entropy(lrr, 0.05) / 2.0
    ect = np.zeros(d.size, dtype=bool)
    pair = (d[:-1] < -0.15) & (d[1:] > 0.1)
    ect[:-1] |= pair
    ect[1:] |= pair
    out[6] = (a[~ect] > 0.06).mean() if (~ect).any() else 0.0
    out[7] = ect.mean() * 2.0
    dev = np.abs(lrr - med)
    out[8] = (dev < 0.05).mean()
    out[9] = (dev < 0.1).mean()
    h, _ = np.histogram(lrr - med, bins=16, range=(-0.8, 0.8))
    p = h[h > 0] / max(h.sum(), 1)
    out[10] = float(-(p * np.log(p)).sum()) / np.log(16)
    out[11] = ((d[1:] * d[:-1]) < 0).mean() if d.size > 1 else 0.0
    out[12] = np.median(dev) * 4.0
    return out


# Rows of this many beats or more (and at most RHYTHM_BLOCK) share one padded computation
# in `rr_features_many`; shorter and longer rows go through `rr_features` one by one.
MANY_MIN_BEATS = 8
HIST_EDGES = np.linspace(-0.8, 0.8, 17)  # np.histogram(bins=16, range=(-0.8, 0.8))'s edges


def rr_features_many(peaks: list, fs: list) -> list[np.ndarray]:
    """`rr_features` of many rows at once: the same numbers (to float32 rounding; sums of
    padded rows may round differently in the last bit of float64), with every NumPy call
    shared by the rows of MANY_MIN_BEATS..RHYTHM_BLOCK beats, one block each.

    Why: scoring makes the features of each batch of rows right before the model. Row by
    row they cost ~0.5 ms for a 10 s record, nearly all of it NumPy's per-call overhead
    on 13-beat arrays, more than the model's forward pass; shared by a batch of 64 rows
    they cost a few percent of that (`benchmarks/bench_score.py`).
    """
    out: list = [None] * len(peaks)
    many = []
    for i, (r, f) in enumerate(zip(peaks, fs, strict=True)):
        if f and MANY_MIN_BEATS <= len(r) <= RHYTHM_BLOCK:
            many.append(i)
        else:
            out[i] = rr_features(r, f)
    if many:
        feats = _rr_features_padded(
            [np.asarray(peaks[i], dtype=np.float64) for i in many], [float(fs[i]) for i in many]
        )
        for i, f in zip(many, feats, strict=True):
            out[i] = f
    return out


def _row_median(v: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of the first `count[b]` values of each row of v (NaN after them), as
    np.median computes it: the middle value, or the mean of the two middle values."""
    s = np.sort(v, axis=1)  # NaN last
    rows = np.arange(v.shape[0])
    hi = s[rows, count // 2]
    lo = s[rows, np.maximum(count // 2 - 1, 0)]
    return np.where(count % 2 == 1, hi, (lo + hi) / 2.0)


def _window_sums(series: np.ndarray, half: int) -> np.ndarray:
    """`_window_sum` along the last axis of (..., T) zero-padded series: padding adds 0, so
    each row's sums match its own unpadded `_window_sum` exactly."""
    t = series.shape[-1]
    c = np.zeros(series.shape[:-1] + (t + 1,))
    np.cumsum(series, axis=-1, out=c[..., 1:])
    i = np.arange(t)
    return c[..., np.minimum(i + half + 1, t)] - c[..., np.maximum(i - half, 0)]


def _sample_entropy_rows(x: np.ndarray, valid: np.ndarray, r: float) -> np.ndarray:
    """`_sample_entropy(row, r)` (m = 1) of each row's valid prefix, (B,) float64."""
    n = valid.sum(axis=1)
    close = np.abs(x[:, :, None] - x[:, None, :]) <= r  # NaN padding is never close
    head = valid[:, :-1] & valid[:, 1:]  # templates x[i], x[i + 1] both inside the row
    pair = head[:, :, None] & head[:, None, :]
    b = (close[:, :-1, :-1] & pair).sum(axis=(1, 2)) - (n - 1)
    a = (close[:, :-1, :-1] & close[:, 1:, 1:] & pair).sum(axis=(1, 2)) - (n - 1)
    return -np.log((a + 1.0) / (b + 1.0))


def _rr_features_padded(rs: list[np.ndarray], fs: list[float]) -> list[np.ndarray]:
    """`rr_features` of rows of MANY_MIN_BEATS..RHYTHM_BLOCK beats, on one padded array."""
    nb = len(rs)
    t = np.array([r.size for r in rs])
    width = int(t.max())
    peaks = np.zeros((nb, width))
    for k, r in enumerate(rs):
        peaks[k, : r.size] = r
        peaks[k, r.size :] = r[-1]
    n = t - 1  # intervals per row
    iv = np.arange(width - 1)[None, :] < n[:, None]  # valid intervals
    lrr = np.where(
        iv, np.log(np.clip(np.diff(peaks, axis=1) / np.array(fs)[:, None], 0.15, 3.0)), np.nan
    )
    med = _row_median(lrr, n)
    d = np.diff(lrr, axis=1)  # successive log ratios, valid where j < n - 1
    dv = np.arange(width - 2)[None, :] < (n - 1)[:, None]
    a = np.where(dv, np.abs(d), 0.0)
    out = np.zeros((nb, width, N_RR_FEATURES), dtype=np.float32)
    dev = lrr - med[:, None]
    out[:, 1:, 0] = np.where(iv, dev, 0.0)
    out[:, :-1, 1] = np.where(iv, dev, 0.0)
    out[:, 1:-1, 2] = np.where(dv, d, 0.0)
    # per beat: |ratio|, valid, changes > 10% and > 4% (0 at the ends, as in rr_features)
    series = np.zeros((4, nb, width))
    series[0, :, 1:-1] = a
    series[1, :, 1:-1] = dv
    series[2, :, 1:-1] = (a > 0.1) & dv
    series[3, :, 1:-1] = (a > 0.04) & dv
    w = _window_sums(series, 4)
    den = np.maximum(w[1], 1.0)
    out[:, :, 3] = w[0] / den * 4.0
    out[:, :, 4] = (_row_median(np.where(dv, a, np.nan), n - 1) * 4.0)[:, None]
    out[:, :, 5] = med[:, None]
    out[:, :, 6] = w[2] / den
    out[:, :, 7] = (series[2].sum(axis=1) / np.maximum(series[1].sum(axis=1), 1.0))[:, None]
    out[:, :, 21] = w[3] / den
    out[:, :, 8:21] = _rhythm_stats_rows(lrr, iv, d, dv, a, med, n)[:, None, :]
    return [out[k, : t[k]] for k in range(nb)]


def _rhythm_stats_rows(lrr, iv, d, dv, a, med, n) -> np.ndarray:
    """`_rhythm_stats` of each row's whole run of log RR intervals (rows of >= 7), (B, 13)."""
    nd = n - 1
    out = np.zeros((lrr.shape[0], 13))
    for i, thr in enumerate((0.02, 0.04, 0.06, 0.2)):
        out[:, i] = ((a > thr) & dv).sum(axis=1) / nd
    rr = np.exp(lrr)
    se = _sample_entropy_rows(rr, iv, 0.03)
    out[:, 4] = (se + np.log(0.06) - np.log(np.where(iv, rr, 0.0).sum(axis=1) / n) + 1.0) / 2.0
    out[:, 5] = _sample_entropy_rows(lrr, iv, 0.05) / 2.0
    pair = (d[:, :-1] < -0.15) & (d[:, 1:] > 0.1) & dv[:, 1:]
    ect = np.zeros(d.shape, dtype=bool)
    ect[:, :-1] |= pair
    ect[:, 1:] |= pair
    regular = dv & ~ect
    kept = regular.sum(axis=1)
    out[:, 6] = np.where(kept > 0, ((a > 0.06) & regular).sum(axis=1) / np.maximum(kept, 1), 0.0)
    out[:, 7] = (ect & dv).sum(axis=1) / nd * 2.0
    dev = np.abs(lrr - med[:, None])
    out[:, 8] = ((dev < 0.05) & iv).sum(axis=1) / n
    out[:, 9] = ((dev < 0.1) & iv).sum(axis=1) / n
    out[:, 10] = _histogram_entropy_rows(lrr - med[:, None], iv)
    turns = ((d[:, 1:] * d[:, :-1]) < 0) & dv[:, 1:]
    out[:, 11] = turns.sum(axis=1) / (nd - 1)
    out[:, 12] = _row_median(np.where(iv, dev, np.nan), n) * 4.0
    return out


def _histogram_entropy_rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Normalised entropy of each row's np.histogram(bins=16, range=(-0.8, 0.8)), with the
    bin of each value found as np.histogram's equal-bin path finds it."""
    first, last, bins = HIST_EDGES[0], HIST_EDGES[-1], HIST_EDGES.size - 1
    keep = valid & (x >= first) & (x <= last)
    rows = np.broadcast_to(np.arange(x.shape[0])[:, None], x.shape)[keep]
    v = x[keep]
    idx = ((v - first) / (last - first) * bins).astype(np.intp)
    idx[idx == bins] -= 1
    idx[v < HIST_EDGES[idx]] -= 1
    idx[(v >= HIST_EDGES[idx + 1]) & (idx != bins - 1)] += 1
    h = np.bincount(rows * bins + idx, minlength=x.shape[0] * bins).reshape(-1, bins)
    p = h / np.maximum(h.sum(axis=1, keepdims=True), 1)
    plogp = np.where(h > 0, p * np.log(np.where(h > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis=1) / np.log(16)


def _window_sum(x: np.ndarray, half: int) -> np.ndarray:
    """Sum of x over [i - half, i + half] (clipped at the ends), same length as x."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(x.size)
    return c[np.minimum(i + half + 1, x.size)] - c[np.maximum(i - half, 0)]


def row_to_example(
    row: dict, max_beats: int = MAX_BEATS, rr: bool = True
) -> dict[str, torch.Tensor]:
    """One token row -> the tensors the model reads (long records keep their first beats).

    Keys: `words` (L, T), `rhythm` (T,), `leads` (L,), `atrial` (L, T) when the row has
    atrial words, `rr` (T, N_RR_FEATURES) when the row has `r_peaks` and `fs`, and
    `tokenizer` (a number from the row's `tokenizer_id`, which the model handler checks
    against the model's tokenizer). With `rr=False` the example carries the row's
    `rr_peaks` and `rr_fs` instead, and `with_rr_features` makes `rr` for a whole batch.
    """
    from ecgtok.transforms.leads import lead_index

    tokens = np.asarray(row["tokens"], dtype=np.int64)
    if tokens.ndim != 2:
        tokens = tokens.reshape(len(row["lead_names"]), -1)
    rhythm = np.asarray(row["rhythm"], dtype=np.int64)
    tokens, rhythm = tokens[:, :max_beats], rhythm[:max_beats]
    leads = np.array([lead_index(n) for n in row["lead_names"]], dtype=np.int64)
    ex = {
        "words": torch.from_numpy(tokens),
        "rhythm": torch.from_numpy(rhythm),
        "leads": torch.from_numpy(leads),
    }
    if row.get("atrial_tokens"):
        atrial = np.asarray(row["atrial_tokens"], dtype=np.int64).reshape(tokens.shape[0], -1)
        ex["atrial"] = torch.from_numpy(atrial[:, :max_beats])
    if row.get("r_peaks") is not None and row.get("fs"):
        if rr:
            ex["rr"] = torch.from_numpy(rr_features(row["r_peaks"], row["fs"])[:max_beats])
        else:  # the whole row's peaks: its RR features read all of them
            ex[RR_PEAKS] = torch.as_tensor(np.asarray(row["r_peaks"], dtype=np.int64))
            ex[RR_FS] = torch.tensor(float(row["fs"]), dtype=torch.float64)
    if row.get("tokenizer_id"):
        ex["tokenizer"] = torch.tensor(tokenizer_number(row["tokenizer_id"]))
    return ex


RR_PEAKS, RR_FS = "rr_peaks", "rr_fs"  # see row_to_example(rr=False)


def with_rr_features(examples: list[dict]) -> list[dict]:
    """The examples, each with `rr` made from its `rr_peaks` and `rr_fs` (new dicts; the
    inputs are left as they are). One `rr_features_many` call serves the whole batch."""
    todo = [i for i, e in enumerate(examples) if "rr" not in e and RR_PEAKS in e]
    if not todo:
        return examples
    feats = rr_features_many(
        [examples[i][RR_PEAKS].numpy() for i in todo], [float(examples[i][RR_FS]) for i in todo]
    )
    out = list(examples)
    for i, f in zip(todo, feats, strict=True):
        ex = {k: v for k, v in examples[i].items() if k not in (RR_PEAKS, RR_FS)}
        ex["rr"] = torch.from_numpy(f[: ex["rhythm"].shape[0]])
        out[i] = ex
    return out


def tokenizer_number(tokenizer_id: str) -> int:
    """A tokenizer id as an int64 that fits a tensor (its first 15 hex digits)."""
    try:
        return int(str(tokenizer_id)[:15], 16)
    except ValueError:
        return -1


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a batch of variable-length examples (leads and beats) into dense tensors.

    `atrial` is in the batch when any example has atrial words (PAD for the others)."""
    n = len(examples)
    max_l = max(1, max(e["leads"].shape[0] for e in examples))
    max_t = max(1, max(e["rhythm"].shape[0] for e in examples))
    words = torch.full((n, max_l, max_t), PAD, dtype=torch.long)
    rhythm = torch.full((n, max_t), PAD, dtype=torch.long)
    leads = torch.full((n, max_l), -1, dtype=torch.long)
    rr = torch.zeros((n, max_t, N_RR_FEATURES), dtype=torch.float32)
    atrial = None
    if any("atrial" in e for e in examples):
        atrial = torch.full((n, max_l, max_t), PAD, dtype=torch.long)
    for i, e in enumerate(examples):
        nl, nt = e["words"].shape
        words[i, :nl, :nt] = e["words"]
        rhythm[i, :nt] = e["rhythm"]
        leads[i, : e["leads"].shape[0]] = e["leads"]
        if "rr" in e:
            rr[i, :nt] = e["rr"][:nt]
        if atrial is not None and "atrial" in e:
            atrial[i, :nl, :nt] = e["atrial"]
    batch = {"words": words, "rhythm": rhythm, "leads": leads, "rr": rr}
    if atrial is not None:
        batch["atrial"] = atrial
    return batch


# Example tensors with one entry per beat: (leads, beats) and (beats, ...).
LEAD_BEAT_KEYS = ("words", "atrial")
BEAT_KEYS = ("rhythm", "rr")


def slice_beats(example: dict, start: int, end: int) -> dict:
    """The beats [start, end) of an example, every lead; other entries as they are."""
    out = dict(example)
    for key in LEAD_BEAT_KEYS:
        if key in example:
            out[key] = example[key][:, start:end]
    for key in BEAT_KEYS:
        if key in example:
            out[key] = example[key][start:end]
    return out


def select_leads(example: dict, keep: list[int]) -> dict:
    """The leads `keep` of an example (all beats)."""
    out = dict(example)
    out["leads"] = example["leads"][keep]
    for key in LEAD_BEAT_KEYS:
        if key in example:
            out[key] = example[key][keep]
    return out


# ---- artifact ----------------------------------------------------------------------------
def save_model(model: EcgLM, config: dict, folder: str) -> str:
    """Write weights (safetensors) and config (JSON, with model_id) to `folder`."""
    from apache_beam.io.filesystems import FileSystems
    from safetensors.torch import save

    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    weights = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    config = {k: v for k, v in config.items() if k != "model_id"}
    config["model_id"] = content_hash(weights, _canonical(config))
    for name, data in (
        (WEIGHTS_FILE, weights),
        (CONFIG_FILE, json.dumps(config, indent=2).encode()),
    ):
        with FileSystems.create(_join(folder, name)) as f:
            f.write(data)
    return config["model_id"]


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def load_model(folder: str, device: str = "cpu") -> tuple[EcgLM, dict]:
    """Load and verify a model directory (local or gs://) onto `device`."""
    from safetensors.torch import load

    weights = _read_bytes(_join(folder, WEIGHTS_FILE))
    try:
        config = json.loads(_read_bytes(_join(folder, CONFIG_FILE)))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{folder}/{CONFIG_FILE} is not valid JSON: {exc}") from exc
    claimed = config.get("model_id")
    actual = content_hash(weights, _canonical({k: v for k, v in config.items() if k != "model_id"}))
    if claimed != actual:
        raise ArtifactError(
            f"model {folder} fails its content check (id {claimed!r}, content {actual!r}): "
            "the files were changed or mixed from two artifacts"
        )
    model = EcgLM(**config["arch"])
    model.load_state_dict(load(weights))
    model.eval()
    return model.to(device), config


def pick_device(requested: str) -> str:
    """'auto' means CUDA when present; 'gpu'/'cuda' fall back to CPU with no GPU."""
    r = requested.lower()
    if r in ("auto", "gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def check_model_tokenizer(config: dict, tokenizer_id: str) -> None:
    """Raise ArtifactError unless a model (its config) reads this tokenizer's words.

    Meant for a job's start, before any record is read: `ecgtok run` with the tokenizer
    it tokenizes with, `ecgtok score` with the `tokenizer_id` of the token shards.
    """
    want = config.get("tokenizer_id")
    if want and tokenizer_id and want != tokenizer_id:
        raise ArtifactError(
            f"model {config.get('model_id')} reads tokenizer {want}, but the tokens come from "
            f"tokenizer {tokenizer_id}: use that model's tokenizer, or a model trained on "
            "these tokens"
        )
