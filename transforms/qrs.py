"""Multi-lead QRS detector: `detect_r_peaks(signal, fs) -> R-peak sample indices`.

Design (vectorised NumPy/SciPy; the only Python loop runs over candidate peaks):

1. **Canonical rate.** Every lead is resampled to `FS_C` = 125 Hz with a short polyphase
   anti-aliasing FIR (about 4.5 output periods long). QRS energy sits in 5-25 Hz, so
   125 Hz keeps it, and everything after this step is independent of the input rate
   (50 Hz to 20 kHz) and cheap.
2. **Feature per lead.** A lag-2 difference ``x[n+2] - x[n-2]`` is a band-pass centred
   at 15.6 Hz (zeros at DC and 31 Hz): it removes baseline wander and mains, keeps QRS
   slopes and damps P and T waves. It is squared and integrated over 100 ms
   (Pan-Tompkins' moving-window integration).
3. **Per-lead scale and quality**, per 2 s block. A lead's scale is the running median
   of its block peaks, so its beats read ~1 whatever the gain. Its quality weight grows
   with the peak-to-floor ratio (a clean ECG returns to ~0 between beats, noise does
   not). Where no lead passes that test, a strictly periodic feature (regular
   wide-complex tachycardia, whose feature never returns to 0) restores the weight.
   The weight is 0 where the lead is flat or looks like ventricular flutter or
   fibrillation. Relative tests demote a lead against a cleaner one (never a lone
   lead): artefacts (block peaks far above the lead's usual beat, a beat scale far
   above its level over the last minute, slow excursions far larger than its QRS),
   and noise bursts judged on 0.5 s sub-blocks.
4. **Fusion.** The normalised features are averaged with the quality weights, so a
   noisy or detached lead fades out instead of adding beats. Where no lead is usable
   the fused feature is 0: flat, lead-off and VF stretches get no beats.
5. **Decision.** Candidate peaks (at least 200 ms apart) go through Pan-Tompkins-style
   adaptive signal/noise levels, a T-wave test (within 360 ms of a beat, a peak whose
   steepest slope is under half the beat's is a T wave), and search-back at half the
   threshold when the gap exceeds 1.66 times the recent mean RR. A search-back beat
   must also be seen by the usable leads that carry at least half of the weight.
6. **Refinement.** Each beat is moved to the extremum of its best lead at the
   canonical rate, then to the extremum of the raw signal at the original rate.

Long records are processed in overlapping chunks (one hour by default), so memory
stays bounded for 24 h Holter recordings. No threshold depends on the record.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy import signal as sps
from scipy.ndimage import uniform_filter1d

from ecgtok.transforms.preprocess import resample_ratio

FS_C = 125.0  # canonical detection rate, Hz
LAG = 2  # samples at FS_C: x[n+LAG] - x[n-LAG] peaks at FS_C / (4 * LAG) = 15.6 Hz
MWI_S = 0.10  # moving-window integration, s
BLOCK_S = 2.0  # scale/quality block, s
SUB_BLOCKS = 4  # noise bursts are judged on quarter blocks
SCALE_BLOCKS = 5  # running median span for a lead's beat scale, blocks
LONG_BLOCKS = 31  # running median span for a lead's long-run beat level, blocks
FLAT_ENERGY = 1e-6  # feature (mV^2) below which a lead is flat
ARTEFACT_EXCESS = 4.0  # block peak / lead scale above which a block holds an artefact
FLOOR_PCT = 0.25  # the block floor is this percentile of the feature
BURST_PCT = 0.25  # the sub-block floor is this percentile of the feature
BURST_FLOOR = 0.05  # sub-block floor / beat scale above which a lead counts as noisy
NORM_CAP = 4.0  # cap on one lead's normalised feature, so one lead cannot outvote others
VT_REGULARITY = 0.9  # feature autocorrelation above which a flutter-like lead is VT
VF_BUSY = 0.01  # block floor / peak of the feature above which a block is 'busy'
REFRACTORY_S = 0.20
CAND_MIN = 0.02  # fused-feature floor for candidate peaks (beats read ~1)
T_WAVE_S = 0.36
SEARCHBACK_RR = 1.66
SUPPORT_LEVEL = 0.02  # a lead "sees" a beat at this fraction of its usual beat energy
CHUNK_S = 3600.0  # processing chunk (the core; the overlap is added both sides), s
OVERLAP_S = 10.0
MAX_CHUNK_LEAD_SAMPLES = 24_000_000  # caps a chunk's raw size for high-rate many-lead input

_EPS = 1e-12


# ---------------------------------------------------------------------------- rate
@lru_cache(maxsize=32)
def _aa_filter(fs: float, fs_out: float) -> tuple[int, int, np.ndarray]:
    """Polyphase (up, down, taps) for fs -> fs_out, ~4.5 output periods long."""
    up, down = resample_ratio(fs, fs_out)
    per_output = max(8, int(np.ceil(4.5 * max(fs, fs_out) / fs_out)))
    n = up * per_output
    n += 1 - n % 2  # odd length keeps resample_poly's output aligned
    cutoff = min(0.3 * fs_out, 0.45 * fs)
    h = sps.firwin(n, cutoff, fs=fs * up, window="hamming")  # resample_poly scales by up
    return up, down, h.astype(np.float32)


def _to_canonical(x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
    """(leads, samples) float32 at FS_C; returns the array and the exact rate used."""
    up, down, h = _aa_filter(float(fs), FS_C)
    if up == down:
        return x.astype(np.float32, copy=True), float(fs)
    y = sps.resample_poly(x, up, down, axis=1, window=h)
    return np.ascontiguousarray(y, dtype=np.float32), float(fs) * up / down


# ------------------------------------------------------------------------ features
def _lead_features(xc: np.ndarray, fs_c: float):
    """Squared slope d2 and its moving-window integral e, per (leads, samples)."""
    d = np.zeros_like(xc)
    if xc.shape[1] > 2 * LAG:
        d[:, LAG:-LAG] = xc[:, 2 * LAG :] - xc[:, : -2 * LAG]
    d2 = d * d
    w = max(3, int(round(MWI_S * fs_c)) | 1)
    return d2, uniform_filter1d(d2, w, axis=1, mode="nearest")


def _blocks(v: np.ndarray, b: int) -> np.ndarray:
    """(leads, n) -> (leads, blocks, b). A partial last block is the record's last b
    samples (overlapping the block before), so its statistics stay honest."""
    n_leads, n = v.shape
    nb = max(1, -(-n // b))
    if nb * b == n:
        return v.reshape(n_leads, nb, b)
    if n < b:
        return np.concatenate([v, np.repeat(v[:, -1:], b - n, axis=1)], axis=1)[:, None, :]
    head = v[:, : (nb - 1) * b].reshape(n_leads, nb - 1, b)
    return np.concatenate([head, v[:, None, n - b :]], axis=1)


def _block_stats(e: np.ndarray, b: int, pct: float = 0.25):
    """Per-block peak and `pct` percentile (the floor) of e, as (leads, blocks)."""
    blocks = _blocks(e, b)
    peak = blocks.max(axis=2)
    sub = blocks[:, :, ::4]  # e is smoothed over 100 ms: every 4th sample will do
    k = int(pct * (sub.shape[2] - 1))
    return peak, np.partition(sub, k, axis=2)[:, :, k]


def _block_wander(xc: np.ndarray, b: int) -> np.ndarray:
    """Per-block peak-to-peak of the slow signal (means over ~b/8 samples)."""
    blocks = _blocks(xc, b)
    g = max(1, b // 8)
    m = blocks[:, :, : (b // g) * g].reshape(blocks.shape[0], blocks.shape[1], -1, g).mean(axis=3)
    return m.max(axis=2) - m.min(axis=2)


def _running_median(v: np.ndarray, span: int) -> np.ndarray:
    """Centred running median along the last axis, edges replicated.

    The window is odd (2 * (span // 2) + 1), so its median is its middle value, which one
    np.partition finds. That is what np.median computes too (partition, then the mean of
    the one middle value), but np.pad, sliding_window_view and np.median spend ~0.15 ms
    per call on a (12, 5) array in Python overhead, twice per record; the windows are
    gathered with one clipped index instead. Windows with a NaN keep np.median's NaN.
    """
    if v.shape[-1] < 2 or span < 2:
        return v.copy()
    h = span // 2
    win = v[..., _median_windows(v.shape[-1], h)]  # (..., n, 2h + 1)
    if np.isnan(v).any():
        return np.median(win, axis=-1)
    return np.partition(win, h, axis=-1)[..., h]


@lru_cache(maxsize=64)
def _median_windows(n: int, h: int) -> np.ndarray:
    """(n, 2h + 1) indices of each centred window, clipped to [0, n - 1] (edge padding)."""
    idx = _clip_index(np.arange(n)[:, None] + np.arange(-h, h + 1)[None, :], n - 1)
    idx.setflags(write=False)
    return idx


def _unit_clip(v: np.ndarray) -> np.ndarray:
    """np.clip(v, 0.0, 1.0), the same values (NaN stays NaN), without np.clip's ~15 us of
    Python overhead per call in NumPy 2."""
    return np.minimum(np.maximum(v, 0.0), 1.0)


def _clip_index(idx: np.ndarray, hi: int) -> np.ndarray:
    """np.clip(idx, 0, hi) for integer indices, without np.clip's Python overhead."""
    return np.minimum(np.maximum(idx, 0), hi)


def _neighbour_max(v: np.ndarray) -> np.ndarray:
    """Max of each block and its two neighbours (events straddle block edges)."""
    if v.shape[1] < 2:
        return v
    left = np.concatenate([v[:, :1], v[:, :-1]], axis=1)
    right = np.concatenate([v[:, 1:], v[:, -1:]], axis=1)
    return np.maximum(v, np.maximum(left, right))


def _by_record(v: np.ndarray, n_leads: int) -> np.ndarray:
    """(records * leads, ...) -> (records, leads, ...): each record's leads together."""
    return v.reshape(-1, n_leads, *v.shape[1:])


def _relative(badness: np.ndarray, usable: np.ndarray, n_leads: int) -> np.ndarray:
    """Weight factor in [0, 1]: a lead much worse than the best usable lead of its
    record fades out. Rows are (records * leads, ...), `n_leads` per record."""
    bad = _by_record(badness, n_leads)
    best = np.where(_by_record(usable, n_leads), bad, np.inf).min(axis=1, keepdims=True)
    rel = _unit_clip(1.25 * np.maximum(best, 1.0) / bad) ** 2
    return np.where(np.isfinite(best), rel, 1.0).reshape(badness.shape)


def _weights(peak: np.ndarray, floor: np.ndarray, wander: np.ndarray, n_leads: int):
    """Beat scale and quality weight in [0, 1], per (records * leads, blocks)."""
    scale = _running_median(peak, SCALE_BLOCKS)
    # a burst of noise in one block must not lift the scale of the clean blocks around it
    scale = np.minimum(scale, np.maximum(peak, 0.25 * scale))
    ratio = scale / (_neighbour_max(floor) + 0.02 * scale + _EPS)
    # peak-to-floor energy ratio: white noise gives ~4-6, a clean ECG hundreds
    q = _unit_clip(np.log10(ratio / 8.0 + _EPS) / np.log10(5.0))
    q[scale < FLAT_ENERGY] = 0.0
    scale = np.maximum(scale, FLAT_ENERGY)
    if n_leads > 1:
        # Artefacts (electrode pops, steps, motion) are sparse and huge, so they pass
        # the peak-to-floor test. Signs of them: block peaks far above the lead's usual
        # beat, a beat scale far above the lead's long-run level (~1 min), and slow
        # excursions much larger than the lead's QRS.
        long = np.maximum(_running_median(peak, LONG_BLOCKS), FLAT_ENERGY)
        badness = np.maximum.reduce(
            [
                np.ones_like(peak),
                peak / scale / ARTEFACT_EXCESS,
                scale / long / 2.5,
                wander / np.sqrt(long),
            ]
        )
        q = q * _relative(badness, q > 0.2, n_leads)
    return scale, q


def _burst_weights(
    e: np.ndarray, sb: int, scale: np.ndarray, q: np.ndarray, n_leads: int
) -> np.ndarray:
    """Per sub-block (~0.5 s) weight factor that demotes a lead during a noise burst.

    A burst shorter than a block barely moves the block's floor, so the floor is
    measured again per sub-block, relative to the lead's beat scale, and compared with
    the other leads.
    """
    _, floor_s = _block_stats(e, sb, BURST_PCT)
    ns = floor_s.shape[1]
    rep_scale = np.repeat(scale, SUB_BLOCKS, axis=1)[:, :ns]
    usable = np.repeat(q, SUB_BLOCKS, axis=1)[:, :ns] > 0.2
    badness = np.maximum(_neighbour_max(floor_s / rep_scale) / BURST_FLOOR, 1.0)
    return _relative(badness, usable, n_leads)


def _lead_sum(parts: np.ndarray) -> np.ndarray:
    """Sums over the leads (axis 1) of (records, leads, k, samples), added one lead after
    another from 0 as a per-lead loop of `+=` does, so the float32 sums are the same bit
    for bit (np.sum is free to pair terms differently). One addition per lead for all
    records' k sums at once, instead of a dozen calls per lead (~0.1 ms on 12 leads)."""
    acc = parts[:, 0] + np.float32(0.0)  # 0 + x: a -0.0 becomes +0.0, as from zeros
    for lead in range(1, parts.shape[1]):
        acc += parts[:, lead]
    return acc


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """`np.stack([np.interp(x, xp, row) for row in fp])` in a few array operations.

    The same arithmetic as NumPy's C loop, in float64: slope (fp[j+1] - fp[j]) /
    (xp[j+1] - xp[j]), value slope * (x - xp[j]) + fp[j] (no fused multiply-add), fp[j]
    where x == xp[j], the end values outside; so the same numbers bit for bit. Rows with
    non-finite values (np.interp retries those the other way round) and a single point
    go through np.interp itself. Saves ~0.1 ms of per-lead calls on a 12-lead record.
    """
    fp = np.asarray(fp, dtype=np.float64)
    n = xp.size
    if n < 2 or not np.isfinite(fp).all():
        return np.stack([np.interp(x, xp, row) for row in fp])
    j = np.searchsorted(xp, x, side="right") - 1  # xp[j] <= x < xp[j + 1]
    jc = _clip_index(j, n - 2)
    slope = (fp[:, 1:] - fp[:, :-1]) / (xp[1:] - xp[:-1])
    out = slope[:, jc] * (x - xp[jc]) + fp[:, jc]
    on_point = (j >= 0) & (xp[np.maximum(j, 0)] == x)
    if on_point.any():
        out[:, on_point] = fp[:, j[on_point]]
    out[:, j < 0] = fp[:, :1]
    out[:, j >= n - 1] = fp[:, -1:]
    return out


def _expand(v: np.ndarray, b: int, n: int) -> np.ndarray:
    """Block values (leads, blocks) -> (leads, n), linear between block centres."""
    n_leads, nb = v.shape
    v = v.astype(np.float32)
    if nb == 1:
        return np.repeat(v, n, axis=1)
    # segment m spans block centres m-1 .. m (m = 0 .. nb), edges held flat
    vp = np.concatenate([v[:, :1], v, v[:, -1:]], axis=1)
    lo, hi = vp[:, :-1], vp[:, 1:]
    frac = (np.arange(b, dtype=np.float32) + 0.5) / b
    seg = lo[:, :, None] + (hi - lo)[:, :, None] * frac[None, None, :]
    flat = seg.reshape(n_leads, -1)
    start = b - b // 2  # segment 0 starts half a block before sample 0
    return flat[:, start : start + n]


class _SpectralPlan(NamedTuple):
    """What `_busy_blocks` needs for one window length and rate, made once (rfftfreq,
    np.hanning and the masks cost ~60 us per record when rebuilt on every call)."""

    nfft: int
    freqs: np.ndarray
    band: slice  # 2.5-8 Hz: flutter/fibrillation
    wide: slice  # 0.7-30 Hz: the ECG's power
    near_peak: np.ndarray  # bin offsets within 0.5 Hz of a peak
    lag_lo: int
    lag_hi: int
    overlap: np.ndarray  # samples per lag, for the unbiased autocorrelation
    taper: np.ndarray
    cols: np.ndarray  # sample offsets of one window


def _bins(mask: np.ndarray) -> slice:
    """The contiguous run of True bins in `mask` as a slice (frequencies are sorted)."""
    on = np.flatnonzero(mask)
    if not on.size or on[-1] - on[0] + 1 != on.size:
        raise ValueError("a spectral band must be a non-empty run of bins")
    return slice(int(on[0]), int(on[-1]) + 1)


@lru_cache(maxsize=16)
def _spectral_plan(win: int, fs_v: float) -> _SpectralPlan:
    nfft = 1 << int(np.ceil(np.log2(2 * win)))  # zero padding: linear autocorrelation
    freqs = np.fft.rfftfreq(nfft, 1.0 / fs_v)
    k = max(1, int(round(0.5 / freqs[1])))
    plan = _SpectralPlan(
        nfft=nfft,
        freqs=freqs,
        band=_bins((freqs >= 2.5) & (freqs <= 8.0)),
        wide=_bins((freqs >= 0.7) & (freqs <= 30.0)),
        near_peak=np.arange(-k, k + 1)[None, :],
        lag_lo=int(0.24 * fs_v),
        lag_hi=min(int(1.5 * fs_v), win // 2),
        overlap=(win - np.arange(win)).astype(np.float64)[None, :],
        taper=np.hanning(win).astype(np.float32),
        cols=np.arange(win)[None, :],
    )
    for v in plan:
        if isinstance(v, np.ndarray):
            v.setflags(write=False)  # shared by every call
    return plan


def _busy_blocks(xc: np.ndarray, e: np.ndarray, fs_c: float, b: int, busy: np.ndarray):
    """Judge blocks where the feature never falls back to its floor.

    There the peak-to-floor quality cannot tell beats from noise, and two rhythms need a
    closer look, each on 4 s windows (two blocks) of each lead:

    * **Ventricular flutter/fibrillation** (returned `vf`, (leads, blocks) bool): a
      continuous oscillation at 2.5-8 Hz (150-480/min) without the flat baseline that
      separates QRS complexes: the band holds most of the power, one narrow spectral
      peak dominates, and the signal spends little time near its baseline. Monomorphic
      ventricular tachycardia under 240/min can look the same in all three; it is told
      apart by its strict regularity (feature autocorrelation >= VT_REGULARITY).
    * **Regular wide-complex rhythms** (returned `periodic`, a quality in [0, 1]):
      ventricular tachycardia or fast bundle-branch rhythms keep the feature busy but
      repeat; the autocorrelation of the feature at an RR lag (0.24-1.5 s) is high,
      while noise decorrelates within ~0.1 s.

    The test runs at half the canonical rate (all it looks at is below 30 Hz), only on
    `busy` windows, which spares the spectra on clean blocks.
    """
    n_leads, n = xc.shape
    nb = busy.shape[1]
    vf = np.zeros((n_leads, nb), dtype=bool)
    periodic = np.zeros((n_leads, nb))
    if n < 2 * b or b % 2:
        return vf, periodic
    fs_v = fs_c / 2
    xv, ev = xc[:, ::2], e[:, ::2]
    bv = b // 2
    win = 2 * bv
    sp = _spectral_plan(win, fs_v)
    all_starts = np.arange(0, xv.shape[1] - win + 1, bv)
    j = all_starts // bv
    # All leads' busy windows in one batch (a per-lead loop cost more in NumPy calls
    # than in arithmetic on 10 s records): rows are (lead, window start) pairs.
    pick = busy[:, j] | busy[:, np.minimum(j + 1, nb - 1)]  # (leads, windows)
    lead_of, which = np.nonzero(pick)
    if lead_of.size == 0:
        return vf, periodic
    starts = all_starts[which]
    blk = starts // bv
    cols = starts[:, None] + sp.cols
    seg = xv[lead_of[:, None], cols]
    seg = seg - seg.mean(axis=1, keepdims=True)
    spec = np.abs(np.fft.rfft(seg * sp.taper, sp.nfft, axis=1)) ** 2
    # The bands are contiguous runs of bins: slices sum the same values in the same
    # order as the boolean masks did, without gathering copies.
    tot = spec[:, sp.wide].sum(axis=1) + _EPS
    in_band = spec[:, sp.band]
    inband = in_band.sum(axis=1) / tot
    # power within 0.5 Hz of the in-band peak; a row without in-band power peaks at bin 0,
    # as the argmax over the whole spectrum with the out-of-band bins zeroed did
    ipk = np.argmax(in_band, axis=1) + sp.band.start
    rows = np.arange(ipk.size)
    ipk[spec[rows, ipk] == 0] = 0
    idx = _clip_index(ipk[:, None] + sp.near_peak, sp.freqs.size - 1)
    conc = spec[rows[:, None], idx].sum(axis=1) / tot
    a = np.abs(seg)  # time near baseline: within 10% of the 95th centile of |x|
    q95 = int(0.95 * (win - 1))
    amp = np.partition(a, q95, axis=1)[:, q95] + _EPS
    near = (a < 0.1 * amp[:, None]).mean(axis=1)
    # periodicity of the feature
    es = ev[lead_of[:, None], cols]
    es = es - es.mean(axis=1, keepdims=True)
    ac = np.fft.irfft(np.abs(np.fft.rfft(es, sp.nfft, axis=1)) ** 2, sp.nfft, axis=1)[:, :win]
    ac = ac / sp.overlap
    score = ac[:, sp.lag_lo : sp.lag_hi].max(axis=1) / (ac[:, 0] + _EPS)
    per = _unit_clip((score - 0.7) / 0.25)
    # a monomorphic VT looks like flutter in the spectrum but repeats exactly
    # (flutter proper, at 240/min and faster, stays flutter however regular)
    vt = (score >= VT_REGULARITY) & (sp.freqs[ipk] < 4.0)
    is_vf = (inband > 0.7) & (conc > 0.4) & (near < 0.2) & ~vt
    for off in (0, 1):
        bi = np.minimum(nb - 1, blk + off)
        vf[lead_of[is_vf], bi[is_vf]] = True
        np.maximum.at(periodic, (lead_of, bi), per)
    return vf, periodic


# ------------------------------------------------------------------------ decision
def _supported(c: int, leads, fs_c: float) -> bool:
    """Whether the usable leads agree on a candidate at canonical sample c.

    A QRS shows in nearly every lead; a noise spike or crackle usually in one. Each
    usable lead (weight >= 0.5) votes with its weight when its own normalised feature
    reaches SUPPORT_LEVEL of its usual beat within +-50 ms; half the vote is needed.
    """
    if leads is None:
        return True
    e, inv, w = leads
    hw = int(round(0.05 * fs_c))
    a, b = max(0, c - hw), min(e.shape[1], c + hw + 1)
    wc = w[:, c]
    usable = wc >= 0.5
    if usable.sum() < 2:
        return True
    lvl = e[:, a:b].max(axis=1) * inv[:, c]
    return float(wc[usable & (lvl >= SUPPORT_LEVEL)].sum()) >= 0.5 * float(wc[usable].sum())


def _decide(f: np.ndarray, g: np.ndarray, fs_c: float, leads=None) -> np.ndarray:
    """Pan-Tompkins-style adaptive decision on the fused feature `f`.

    `g` is the fused squared slope (for the T-wave test); `leads` = (e, inv, w) per lead
    enables the agreement test on search-back beats. Returns canonical sample indices.
    """
    n = f.shape[0]
    refr = int(round(REFRACTORY_S * fs_c))
    cand, _ = sps.find_peaks(f, height=CAND_MIN, distance=max(1, refr))
    if cand.size == 0:
        return cand.astype(np.int64)
    t_wave = int(round(T_WAVE_S * fs_c))
    ts = cand.tolist()
    hs = f[cand].tolist()
    hw = int(round(0.04 * fs_c))  # steepest fused slope within +-40 ms of a candidate
    win = _clip_index(cand[:, None] + np.arange(-hw, hw + 1)[None, :], n - 1)
    sls = g[win].max(axis=1).tolist()

    init = int(2 * fs_c)
    first = [h for t, h in zip(ts, hs) if t < init]
    spk = max(0.5 * (max(first) if first else max(hs)), 0.3)
    npk = 0.1 * spk
    thr = npk + 0.25 * (spk - npk)

    beats: list[int] = []
    rr8 = [0] * 8  # the last 8 RR intervals (ring), for the search-back gap
    n_rr = 0
    gap = SEARCHBACK_RR * 1.0 * fs_c  # until the first RR interval is measured
    last_t = -(10**9)
    last_slope = 0.0
    last_ci = -1
    n_cand = len(ts)
    i = 0
    while i <= n_cand:
        t = ts[i] if i < n_cand else n + refr + 1  # past the end: final search-back
        if beats and t - last_t > gap:
            # search-back: a gap too long for the recent rhythm hides a missed beat
            best, best_h = -1, 0.5 * thr
            for j in range(last_ci + 1, i):
                tj = ts[j]
                if tj - last_t > refr and t - tj > refr and hs[j] > best_h:
                    if tj - last_t < t_wave and sls[j] < 0.5 * last_slope:
                        continue  # the last beat's T wave
                    if _supported(tj, leads, fs_c):
                        best, best_h = j, hs[j]
            if best >= 0:
                tc = ts[best]
                rr8[n_rr % 8] = tc - last_t
                n_rr += 1
                gap = SEARCHBACK_RR * sum(rr8) / (n_rr if n_rr < 8 else 8)
                beats.append(tc)
                last_t, last_slope, last_ci = tc, sls[best], best
                cap = 2.0 * spk if spk > 0.5 else 1.0
                spk = 0.25 * (best_h if best_h < cap else cap) + 0.75 * spk
            else:
                # nothing even at half threshold: the level fell, or an artefact
                # inflated it; let it decay instead of going deaf
                spk *= 0.8
            thr = npk + 0.25 * (spk - npk)
        if i == n_cand:
            break
        h = hs[i]
        if t - last_t > refr:
            if h > thr and not (t - last_t < t_wave and sls[i] < 0.5 * last_slope):
                if beats:
                    rr8[n_rr % 8] = t - last_t
                    n_rr += 1
                    gap = SEARCHBACK_RR * sum(rr8) / (n_rr if n_rr < 8 else 8)
                beats.append(t)
                last_t, last_slope, last_ci = t, sls[i], i
                # features are normalised (beats ~1): an artefact must not deafen us
                cap = 2.0 * spk if spk > 0.5 else 1.0
                spk = 0.125 * (h if h < cap else cap) + 0.875 * spk
            else:  # below threshold, or a T wave
                npk = 0.125 * h + 0.875 * npk
            thr = npk + 0.25 * (spk - npk)
        i += 1
    return np.asarray(sorted(beats), dtype=np.int64)


# ---------------------------------------------------------------------- refinement
def _refine(x, fs, xc, fs_c, beats_c, contrib) -> np.ndarray:
    """Move each beat to the R extremum of its best lead, at the original rate.

    `contrib` (leads, beats) is each lead's weighted share of the fused feature at the
    beat; the largest share names the best lead.
    """
    n_leads, n = x.shape
    nc = xc.shape[1]
    rows = np.arange(beats_c.size)
    best = np.argmax(contrib, axis=0) if n_leads > 1 else np.zeros(beats_c.size, int)
    flat_c, flat = xc.ravel(), x.ravel()
    row_c, row = (best * nc)[:, None], (best * n)[:, None]
    # baseline: mean of the best lead over +-150 ms
    hb = max(1, int(round(0.15 * fs_c)))
    idx_b = _clip_index(beats_c[:, None] + np.arange(-hb, hb + 1)[None, :], nc - 1)
    baseline = flat_c[row_c + idx_b].mean(axis=1)
    # canonical rate: largest deviation from the baseline within +-60 ms
    hw = max(1, int(round(0.06 * fs_c)))
    idx = _clip_index(beats_c[:, None] + np.arange(-hw, hw + 1)[None, :], nc - 1)
    seg = flat_c[row_c + idx] - baseline[:, None]
    k = np.argmax(np.abs(seg), axis=1)
    pc = idx[rows, k]
    sign = np.where(seg[rows, k] < 0, -1.0, 1.0).astype(np.float32)
    # original rate: extremum of the same polarity within +-1.5 canonical samples
    ratio = fs / fs_c
    centre = np.round(pc * ratio).astype(np.int64)
    hw2 = max(1, int(np.ceil(1.5 * ratio)))
    idx2 = _clip_index(centre[:, None] + np.arange(-hw2, hw2 + 1)[None, :], n - 1)
    raw = (flat[row + idx2] - baseline[:, None]) * sign[:, None]
    r = np.sort(idx2[rows, np.argmax(raw, axis=1)].astype(np.int64))
    if r.size < 2:
        return r
    keep = np.empty(r.size, dtype=bool)  # drop duplicates (two beats on one extremum)
    keep[0] = True
    np.greater(r[1:], r[:-1], out=keep[1:])
    return r[keep]


def _detect_chunk(x: np.ndarray, fs: float) -> np.ndarray:
    """x: (leads, samples) float32 at fs. Returns R peaks at the original rate."""
    return _detect_chunks(x[None], fs)[0]


def _detect_chunks(x: np.ndarray, fs: float) -> list[np.ndarray]:
    """x: (records, leads, samples) float32 at fs, records of the same shape. Returns each
    record's R peaks at the original rate.

    Every step runs on all records' leads at once, as rows of a (records * leads, ...)
    array, and only the steps that compare a record's leads see them grouped: the same
    arithmetic on each row as for one record alone, so the same beats, at a fraction of
    the per-call cost on short records (~0.7 ms of a 10 s 12-lead record's 1.3 ms is
    the fixed cost of ~300 NumPy calls).
    """
    n_rec, n_leads, n = x.shape
    if n < 4:
        return [np.zeros(0, dtype=np.int64) for _ in range(n_rec)]
    xc, fs_c = _to_canonical(x.reshape(n_rec * n_leads, n), fs)
    nc = xc.shape[1]
    sb = max(2, int(round(BLOCK_S / SUB_BLOCKS * fs_c)))  # sub-block, ~0.5 s
    b = SUB_BLOCKS * sb  # block, ~2 s
    d2, e = _lead_features(xc, fs_c)
    peak, floor = _block_stats(e, b, FLOOR_PCT)
    scale, q = _weights(peak, floor, _block_wander(xc, b), n_leads)
    vf, periodic = _busy_blocks(xc, e, fs_c, b, floor > VF_BUSY * peak)
    # periodicity only rescues blocks that no lead can serve by its floor: where a lead
    # is clean, a noisy but rhythmic lead must not gain weight
    q_r = _by_record(q, n_leads)
    rescue = q_r.max(axis=1, keepdims=True) < 0.3
    q = np.where(rescue, np.maximum(q_r, _by_record(periodic, n_leads)), q_r).reshape(q.shape)
    q[vf] = 0.0
    # per sub-block: the lead's 1/scale and its weight (with the burst factor), then
    # one interpolation to samples
    rows = n_rec * n_leads
    ns = -(-nc // sb)
    t_s, t_b = (np.arange(ns) + 0.5) * sb, (np.arange(scale.shape[1]) + 0.5) * b
    both_s = _interp_rows(t_s, t_b, np.concatenate([1.0 / scale, q]))
    inv_s, w_s = both_s[:rows], both_s[rows:]
    if n_leads > 1:
        w_s = w_s * _burst_weights(e, sb, scale, q, n_leads)
    both = _expand(np.concatenate([inv_s, w_s]), sb, nc)
    inv, w = both[:rows], both[rows:]
    # fused feature f (capped, normalised energy), fused squared slope g and the weight
    # sum, on one (records, leads, 3, samples) stack: each lead's three rows contiguous
    parts = np.empty((n_rec, n_leads, 3, nc), np.float32)
    fl, gl = parts[:, :, 0], parts[:, :, 1]
    np.multiply(_by_record(e, n_leads), _by_record(inv, n_leads), out=fl)
    np.minimum(fl, NORM_CAP, out=fl)
    fl *= _by_record(w, n_leads)
    np.multiply(_by_record(d2, n_leads), _by_record(inv, n_leads), out=gl)
    gl *= _by_record(w, n_leads)
    parts[:, :, 2] = _by_record(w, n_leads)
    sums = _lead_sum(parts)  # (records, 3, samples)
    f, g, wsum = sums[:, 0], sums[:, 1], sums[:, 2]
    norm = 1.0 / np.maximum(wsum, 0.5)
    f *= norm
    g *= norm
    f[wsum < 0.05] = 0.0
    peaks = []
    for r in range(n_rec):
        lo, hi = r * n_leads, (r + 1) * n_leads
        e_r, inv_r, w_r = e[lo:hi], inv[lo:hi], w[lo:hi]
        beats_c = _decide(f[r], g[r], fs_c, (e_r, inv_r, w_r) if n_leads > 1 else None)
        if beats_c.size == 0:
            peaks.append(beats_c)
            continue
        contrib = w_r[:, beats_c] * np.minimum(e_r[:, beats_c] * inv_r[:, beats_c], NORM_CAP)
        peaks.append(_refine(x[r], fs, xc[lo:hi], fs_c, beats_c, contrib))
    return peaks


def _leads_first(x: np.ndarray) -> np.ndarray:
    """(samples, leads) -> contiguous float32 (leads, samples); non-finite -> 0 (flat)."""
    xt = np.ascontiguousarray(x.T, dtype=np.float32)
    finite = np.isfinite(xt)
    if not finite.all():  # NaN/inf are rare
        # A single float32 lead's transpose is a view of the caller's array: never write
        # into it (beat quality and the tokenizer must still see the NaN).
        xt = np.where(finite, xt, np.float32(0.0))
    return xt


def _check_rate(fs: float) -> float:
    fs = float(fs)
    if not np.isfinite(fs) or fs <= 0:
        raise ValueError(f"sampling rate {fs!r} is not valid")
    return fs


def _core_and_overlap(n_leads: int, fs: float) -> tuple[int, int]:
    """Chunk core and overlap (samples) of a long record."""
    core = int(min(CHUNK_S * fs, max(60 * fs, MAX_CHUNK_LEAD_SAMPLES // n_leads)))
    return core, int(OVERLAP_S * fs)


def detect_r_peaks_many(signals: list[np.ndarray], fs: float) -> list[np.ndarray]:
    """`detect_r_peaks` of several records of one shape (samples, leads) and one rate,
    in one pass over all of them: the same peaks as one record at a time, at a fraction
    of the cost per record on short records (see `_detect_chunks`)."""
    fs = _check_rate(fs)
    if not signals:
        return []
    shapes = {np.shape(s) for s in signals}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"records of one (samples, leads) shape are needed, got {shapes}")
    n, n_leads = next(iter(shapes))
    core, ov = _core_and_overlap(max(n_leads, 1), fs)
    if len(signals) == 1 or n == 0 or n_leads == 0 or n > core + 2 * ov:
        return [detect_r_peaks(s, fs) for s in signals]
    return detect_r_peaks_stacked(lead_major_stack(signals), fs)


def lead_major_stack(signals: list[np.ndarray]) -> np.ndarray:
    """Records of one (samples, leads) shape as one (records, leads, samples) float32
    array: each lead a contiguous row, as the detector and beat quality read them."""
    n, n_leads = np.shape(signals[0])
    x = np.empty((len(signals), n_leads, n), dtype=np.float32)
    for r, s in enumerate(signals):
        x[r] = np.asarray(s).T
    return x


def detect_r_peaks_stacked(x: np.ndarray, fs: float) -> list[np.ndarray]:
    """`detect_r_peaks` of each record of a `lead_major_stack` (short records: see
    `detect_r_peaks_many`). Non-finite samples are read as 0 (flat), in a copy."""
    fs = _check_rate(fs)
    n_rec, n_leads, n = x.shape
    core, ov = _core_and_overlap(max(n_leads, 1), fs)
    if n == 0 or n_leads == 0 or n > core + 2 * ov:
        return [detect_r_peaks(r.T, fs) for r in x]
    finite = np.isfinite(x)
    if not finite.all():  # non-finite -> 0 (flat), as `_leads_first` does
        x = np.where(finite, x, np.float32(0.0))
    return _detect_chunks(x, fs)


def detect_r_peaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices (sorted, unique, int64) at the original rate.

    Parameters
    ----------
    signal : (n_samples, n_leads) or (n_samples,) array, mV. Non-finite samples are
        treated as a flat (lead-off) signal.
    fs : sampling rate, Hz (50 Hz to 20 kHz).
    """
    fs = _check_rate(fs)
    x = np.asarray(signal)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"signal must be 1-D or (samples, leads), got shape {x.shape}")
    n, n_leads = x.shape
    if n == 0 or n_leads == 0:
        return np.zeros(0, dtype=np.int64)
    core, ov = _core_and_overlap(n_leads, fs)
    if n <= core + 2 * ov:
        return _detect_chunk(_leads_first(x), fs)
    n_chunks = -(-n // core)
    core = -(-n // n_chunks)  # equal chunks: no tiny last one
    out = []
    for a in range(0, n, core):
        b = min(n, a + core)
        lo, hi = max(0, a - ov), min(n, b + ov)
        p = _detect_chunk(_leads_first(x[lo:hi]), fs) + lo
        out.append(p[(p >= a) & (p < b)])
    peaks = np.concatenate(out)
    if peaks.size > 1:
        # a beat on a chunk edge can be found by both chunks, a sample or two apart
        peaks = peaks[np.concatenate([[True], np.diff(peaks) > int(0.1 * fs)])]
    return peaks
