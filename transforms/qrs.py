"""Multi-lead QRS detector: `detect_r_peaks(signal, fs) -> R-peak sample indices`.

Design (all of it vectorised NumPy/SciPy, one Python loop over candidate peaks):

1. **Canonical rate.** Every lead is resampled to `FS_C` = 125 Hz with a short polyphase
   anti-aliasing FIR (about 4 output periods long). QRS energy sits in 5-25 Hz, so
   125 Hz keeps it and makes everything after this step independent of the input
   rate (50 Hz to 20 kHz) and cheap.
2. **Feature per lead.** A lag-2 difference ``x[n+2] - x[n-2]`` is a band-pass centred at
   15.6 Hz (zeros at DC and 31 Hz): it removes baseline wander and mains, keeps QRS
   slopes and damps P/T waves. It is squared and integrated over a 100 ms window
   (Pan-Tompkins' moving-window integration).
3. **Per-lead normalisation and quality.** Per 2 s block: the peak of the feature and
   its 25th percentile (the floor between beats). A lead's scale is the running median
   of the block peaks (so beats read ~1); its quality weight grows with the
   peak-to-floor ratio and is 0 where the lead is flat, saturated or pure noise.
4. **Fusion.** The normalised features are averaged with the quality weights, so a
   noisy or detached lead fades out instead of adding false beats. Where no lead is
   usable the fused feature is 0, so flat or lead-off stretches get no beats.
5. **Decision.** Candidate peaks (at least 200 ms apart) go through Pan-Tompkins-style
   adaptive signal/noise levels, a T-wave test (a peak within 360 ms of a beat whose
   steepest slope is under half the beat's is a T wave), and search-back at half the
   threshold when the gap exceeds 1.66 times the recent mean RR interval.
6. **Ventricular flutter/fibrillation.** Stretches where the best lead is a
   near-sinusoid at 2.5-8 Hz with no flat baseline between waves get no beats.
7. **Refinement.** Each beat is placed on the extremum of the best lead at the
   canonical rate, then on the extremum of the raw signal at the original rate.

Long records are processed in overlapping chunks, so memory stays bounded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from ecgtok.transforms.preprocess import resample_ratio
from scipy import signal as sps
from scipy.ndimage import uniform_filter1d

FS_C = 125.0  # canonical detection rate, Hz
LAG = 2  # samples at FS_C: x[n+LAG] - x[n-LAG] peaks at FS_C / (4 * LAG) = 15.6 Hz
MWI_S = 0.10  # moving-window integration, s
BLOCK_S = 2.0  # quality/scale block, s
SUB_BLOCKS = 4  # noise bursts are judged on quarter blocks
BURST_PCT = 0.25  # a burst fills the sub-block; a wide beat does not
BURST_FLOOR = 0.05  # sub-block floor / beat scale above which a lead counts as noisy
SCALE_BLOCKS = 5  # running median span for the lead scale, blocks
LONG_BLOCKS = 31  # running median span for a lead's long-run beat level, blocks
REFRACTORY_S = 0.20
T_WAVE_S = 0.36
SEARCHBACK_RR = 1.66
VF_BUSY = 0.01  # block floor / peak of the feature above which VF is tested for
SUPPORT_LEVEL = 0.02  # a lead "sees" a beat at this fraction of its usual beat energy
SUPPORT_SHARE = 0.5  # share of the usable leads' weight that must see a beat
CHUNK_S = 3600.0  # processing chunk, s (the core; overlap is added both sides)
OVERLAP_S = 10.0
MAX_CHUNK_LEAD_SAMPLES = 24_000_000  # caps a chunk's raw size for high-rate many-lead input
ARTEFACT_EXCESS = 4.0  # block peak / lead scale (energy) above which a lead is suspect
NORM_CAP = 4.0  # cap on one lead's normalised feature, so one lead cannot outvote the rest
FLAT_ENERGY = 1e-6  # feature floor (mV^2): a lead below this is treated as flat

_EPS = 1e-12


@lru_cache(maxsize=32)
def _aa_filter(fs: float, fs_out: float) -> tuple[int, int, np.ndarray]:
    """Polyphase (up, down, taps) for fs -> fs_out, ~4.5 output periods long."""
    up, down = resample_ratio(fs, fs_out)
    per_output = max(8, int(np.ceil(4.5 * max(fs, fs_out) / fs_out)))
    n = up * per_output
    n += 1 - n % 2  # odd length: resample_poly then keeps samples aligned
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


def _lead_features(xc: np.ndarray, fs_c: float):
    """Slope feature d, energy e (MWI of d^2), per leads x samples."""
    n = xc.shape[1]
    d = np.zeros_like(xc)
    if n > 2 * LAG:
        d[:, LAG:-LAG] = xc[:, 2 * LAG :] - xc[:, : -2 * LAG]
    d2 = d * d
    w = max(3, int(round(MWI_S * fs_c)) | 1)
    e = uniform_filter1d(d2, w, axis=1, mode="nearest")
    return d, d2, e


def _block_stats(e: np.ndarray, b: int, pct: float = 0.25):
    """Per-block peak and `pct` percentile of e (leads, blocks); last partial block padded."""
    n_leads, n = e.shape
    nb = max(1, -(-n // b))
    pad = nb * b - n
    if pad:
        tail = e[:, max(0, n - b) :]
        # pad the last block with its own content so its statistics stay honest
        reps = np.resize(tail, (n_leads, pad)) if tail.shape[1] else np.zeros((n_leads, pad))
        e = np.concatenate([e, reps.astype(e.dtype)], axis=1)
    blocks = e.reshape(n_leads, nb, b)
    peak = blocks.max(axis=2)
    # e is smoothed over 100 ms, so every 4th sample is enough for a percentile
    sub = blocks[:, :, ::4]
    k = int(pct * (sub.shape[2] - 1))
    floor = np.partition(sub, k, axis=2)[:, :, k]
    return peak, floor


def _block_ptp(v: np.ndarray, b: int) -> np.ndarray:
    """Per-block peak-to-peak (leads, blocks)."""
    n_leads, n = v.shape
    nb = max(1, -(-n // b))
    pad = nb * b - n
    if pad:
        v = np.concatenate([v, np.repeat(v[:, -1:], pad, axis=1)], axis=1)
    blocks = v.reshape(n_leads, nb, b)
    return blocks.max(axis=2) - blocks.min(axis=2)


def _running_median(v: np.ndarray, span: int) -> np.ndarray:
    """Centred running median along the last axis with edge replication."""
    if v.shape[-1] < 2 or span < 2:
        return v.copy()
    h = span // 2
    p = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(h, h)], mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(p, 2 * h + 1, axis=-1)
    return np.median(win, axis=-1)


def _weights(peak: np.ndarray, floor: np.ndarray, wander: np.ndarray):
    """Scale (leads, blocks) and quality weight in [0, 1].

    `wander` is the block's peak-to-peak excursion of the slow (<~3 Hz) signal.
    """
    scale = _running_median(peak, SCALE_BLOCKS)
    # a burst of noise inside a block must not lift the scale of clean blocks around it
    scale = np.minimum(scale, np.maximum(peak, 0.25 * scale))
    # local floor: worst of the block and its neighbours (bursts straddle block edges)
    fl = floor
    if floor.shape[1] > 1:
        fl = np.maximum(floor, np.maximum(np.roll(floor, 1, axis=1), np.roll(floor, -1, axis=1)))
        fl[:, 0] = np.maximum(floor[:, 0], floor[:, 1])
        fl[:, -1] = np.maximum(floor[:, -1], floor[:, -2])
    ratio = scale / (fl + 0.02 * scale + _EPS)
    # peak-to-floor energy ratio: white noise gives ~4-6, a clean ECG hundreds
    q = np.clip((np.log10(ratio + _EPS) - np.log10(8.0)) / (np.log10(40.0) - np.log10(8.0)), 0, 1)
    q[scale < FLAT_ENERGY] = 0.0
    scale = np.maximum(scale, FLAT_ENERGY)
    if peak.shape[0] > 1:
        # Artefacts (electrode pops, steps, motion) are sparse and huge, so they pass
        # the peak-to-floor test. Two signs of them: block peaks far above the lead's
        # usual beat, and slow excursions much larger than the QRS. They only demote a
        # lead relative to a cleaner one; a lone lead keeps its weight.
        # the lead's long-run beat level (~1 min): artefact stretches of a few seconds
        # inflate the short scale but not this
        long = np.maximum(_running_median(peak, LONG_BLOCKS), FLAT_ENERGY)
        amp = np.sqrt(long)  # ~ QRS slope amplitude (mV per lag)
        badness = np.maximum.reduce(
            [
                np.ones_like(peak),
                peak / scale / ARTEFACT_EXCESS,
                scale / long / 2.5,
                wander / amp,
            ]
        )
        usable = q > 0.2
        best = np.where(usable, badness, np.inf).min(axis=0, keepdims=True)
        rel = np.clip(1.25 * np.maximum(best, 1.0) / badness, 0.0, 1.0) ** 2
        q = np.where(np.isfinite(best), q * rel, q)
    return scale, q


def _block_sum(v: np.ndarray, b: int) -> np.ndarray:
    """Per-block sums (leads, blocks); the last partial block is summed as it is."""
    n_leads, n = v.shape
    nb = -(-n // b)
    pad = nb * b - n
    if pad:
        v = np.concatenate([v, np.zeros((n_leads, pad), v.dtype)], axis=1)
    return v.reshape(n_leads, nb, b).sum(axis=2)


def _burst_weights(e: np.ndarray, sb: int, scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per sub-block (~0.5 s) weight in [0, 1] that demotes a lead during a noise burst.

    A burst shorter than a block barely moves the block's floor, so the floor (a low
    percentile of the feature) is measured again per sub-block, relative to the lead's
    beat scale. Like the artefact tests this is relative: a lead only loses weight where
    another usable lead is much quieter, so a lone noisy lead keeps detecting.
    """
    _, floor_s = _block_stats(e, sb, BURST_PCT)
    ns = floor_s.shape[1]
    rep = np.repeat(scale, SUB_BLOCKS, axis=1)[:, :ns]
    ok = np.repeat(q, SUB_BLOCKS, axis=1)[:, :ns] > 0.2
    nz = floor_s / rep
    if ns > 1:  # a burst straddling a sub-block edge counts in both
        nz = np.maximum(nz, np.concatenate([nz[:, 1:], nz[:, -1:]], axis=1))
        nz = np.maximum(nz, np.concatenate([nz[:, :1], nz[:, :-1]], axis=1))
    badness = np.maximum(nz / BURST_FLOOR, 1.0)
    best = np.where(ok, badness, np.inf).min(axis=0, keepdims=True)
    rel = np.clip(1.25 * best / badness, 0.0, 1.0) ** 2
    return np.where(np.isfinite(best), rel, 1.0)


def _expand(v: np.ndarray, b: int, n: int) -> np.ndarray:
    """Block values (leads, blocks) -> per-sample (leads, n), linear between block centres.

    Repeating each block value and smoothing with a one-block box gives exactly the
    linear interpolation, at a fraction of the cost of `np.interp` per lead.
    """
    r = np.repeat(v.astype(np.float32), b, axis=1)[:, :n]
    if v.shape[1] > 1:
        r = uniform_filter1d(r, b, axis=1, mode="nearest")
    return r


def _vf_mask(xc: np.ndarray, fs_c: float, b: int, busy: np.ndarray) -> np.ndarray:
    """(leads, blocks) True where a lead looks like ventricular flutter/fibrillation.

    VF/VFL is a continuous large oscillation at 2.5-8 Hz without the flat baseline that
    separates QRS complexes. Test on 4 s windows (two blocks) of each lead: the
    band 2.5-8 Hz holds most of the power, one narrow spectral peak dominates, and the
    signal spends little time near its baseline. The test runs at half the canonical
    rate (everything it looks at is below 30 Hz), and only on windows where `busy`
    (leads, blocks) says the feature never falls back to its floor; a QRS train with a
    flat baseline between beats cannot be VF, which spares the spectra on most blocks.
    """
    n_leads, n = xc.shape
    nb = -(-n // b)
    out = np.zeros((n_leads, nb), dtype=bool)
    if n < 2 * b or b % 2:
        return out
    fs_v = fs_c / 2
    xv = xc[:, ::2]
    bv = b // 2
    win = 2 * bv
    nfft = 1 << int(np.ceil(np.log2(win)))
    freqs = np.fft.rfftfreq(nfft, 1.0 / fs_v)
    band = (freqs >= 2.5) & (freqs <= 8.0)
    wide = (freqs >= 0.7) & (freqs <= 30.0)
    k = max(1, int(round(0.5 / freqs[1])))
    taper = np.hanning(win).astype(np.float32)
    all_starts = np.arange(0, xv.shape[1] - win + 1, bv)
    for lead in range(n_leads):
        j = all_starts // bv
        starts = all_starts[busy[lead, j] | busy[lead, np.minimum(j + 1, nb - 1)]]
        if starts.size == 0:
            continue
        seg = np.lib.stride_tricks.sliding_window_view(xv[lead], win)[starts]
        seg = seg - seg.mean(axis=1, keepdims=True)
        spec = np.abs(np.fft.rfft(seg * taper, nfft, axis=1)) ** 2
        tot = spec[:, wide].sum(axis=1) + _EPS
        inband = spec[:, band].sum(axis=1) / tot
        # concentration: power within +-0.5 Hz of the band peak
        ipk = np.argmax(np.where(band, spec, 0), axis=1)
        idx = np.clip(ipk[:, None] + np.arange(-k, k + 1)[None, :], 0, len(freqs) - 1)
        conc = np.take_along_axis(spec, idx, axis=1).sum(axis=1) / tot
        # time near baseline: fraction of samples within 10% of the 95th centile of |x|
        a = np.abs(seg)
        q95 = int(0.95 * (win - 1))
        amp = np.partition(a, q95, axis=1)[:, q95] + _EPS
        near = (a < 0.1 * amp[:, None]).mean(axis=1)
        vf = (inband > 0.7) & (conc > 0.4) & (near < 0.12)
        blk = starts[vf] // bv
        out[lead, blk] = True
        out[lead, np.minimum(nb - 1, blk + 1)] = True
    return out


def _support(cand: np.ndarray, leads, fs_c: float) -> np.ndarray:
    """True for candidates that the usable leads agree on.

    A QRS shows in nearly every lead; a noise spike or crackle usually in one. Each
    usable lead (weight >= 0.5) votes with its weight for a candidate when its own
    normalised feature reaches SUPPORT_LEVEL of its usual beat within +-50 ms.
    Candidates need at least half of the vote; where fewer than two leads are usable
    every candidate passes.
    """
    e, inv, w = leads
    n = e.shape[1]
    hw = int(round(0.05 * fs_c))
    win = np.clip(cand[:, None] + np.arange(-hw, hw + 1)[None, :], 0, n - 1)
    lvl = (e[:, win] * inv[:, cand][:, :, None]).max(axis=2)  # (leads, cand)
    wc = w[:, cand]
    usable = wc >= 0.5
    vote = np.where(usable, wc, 0.0)
    total = vote.sum(axis=0)
    yes = np.where(lvl >= SUPPORT_LEVEL, vote, 0.0).sum(axis=0)
    return (usable.sum(axis=0) < 2) | (yes >= SUPPORT_SHARE * total)


def _decide(f: np.ndarray, g: np.ndarray, fs_c: float, leads=None) -> np.ndarray:
    """Pan-Tompkins-style adaptive decision on the fused feature `f` (fused squared slope
    `g` for the T-wave test). `leads` = (e, inv, w) per lead enables the cross-lead
    agreement test. Returns sample indices at the canonical rate."""
    n = f.shape[0]
    refr = int(round(REFRACTORY_S * fs_c))
    cand, _ = sps.find_peaks(f, height=0.02, distance=max(1, refr))
    if cand.size == 0:
        return cand.astype(np.int64)
    t_wave = int(round(T_WAVE_S * fs_c))
    ts = cand.tolist()
    hs = f[cand].tolist()
    # steepest fused slope within +-40 ms of each candidate (for the T-wave test)
    hw = int(round(0.04 * fs_c))
    win = np.clip(cand[:, None] + np.arange(-hw, hw + 1)[None, :], 0, n - 1)
    sls = g[win].max(axis=1).tolist()
    sup = _support(cand, leads, fs_c).tolist() if leads is not None else [True] * len(ts)

    init = int(2 * fs_c)
    first = [h for t, h in zip(ts, hs) if t < init]
    spk = max(0.5 * (max(first) if first else max(hs)), 0.3)
    npk = 0.1 * spk
    thr = npk + 0.25 * (spk - npk)

    beats: list[int] = []
    rr: list[int] = []
    rr_avg = 0.8 * fs_c
    last_t = -(10**9)
    last_slope = 0.0
    last_ci = -1

    def accept(ci: int, weight: float) -> None:
        nonlocal spk, rr_avg, last_ci, last_t, last_slope
        t = ts[ci]
        if beats:
            rr.append(t - last_t)
            recent = rr[-8:]
            rr_avg = sum(recent) / len(recent)
        beats.append(t)
        last_t = t
        last_slope = sls[ci]
        # features are normalised (beats ~1): an artefact must not deafen the detector
        spk = weight * min(hs[ci], 2.0 * max(spk, 0.5)) + (1 - weight) * spk
        last_ci = ci

    def search_back(end_ci: int, t_end: int) -> bool:
        """Best candidate in (last beat, t_end) above half the threshold, if any."""
        best, best_h = -1, 0.5 * thr
        for j in range(last_ci + 1, end_ci):
            tj = ts[j]
            if tj - last_t > refr and t_end - tj > refr and hs[j] > best_h and sup[j]:
                best, best_h = j, hs[j]
        if best >= 0:
            accept(best, 0.25)
            return True
        return False

    for i in range(len(ts)):
        t = ts[i]
        h = hs[i]
        # search-back: a gap too long for the recent rhythm hides a missed beat
        if beats and t - last_t > SEARCHBACK_RR * rr_avg:
            if not search_back(i, t):
                # nothing even at half threshold: the signal level fell (or an
                # artefact inflated it); let the level decay instead of going deaf
                spk *= 0.8
            thr = npk + 0.25 * (spk - npk)
        if t - last_t <= refr:
            continue
        if h > thr:
            if t - last_t < t_wave and sls[i] < 0.5 * last_slope:
                npk = 0.125 * h + 0.875 * npk  # a T wave
            else:
                accept(i, 0.125)
        else:
            npk = 0.125 * h + 0.875 * npk
        thr = npk + 0.25 * (spk - npk)
    # search-back at the end of the record
    if beats and n - last_t > SEARCHBACK_RR * rr_avg:
        search_back(len(ts), n + refr + 1)
    return np.asarray(sorted(beats), dtype=np.int64)


def _detect_chunk(x: np.ndarray, fs: float) -> np.ndarray:
    """x: (leads, samples) float32 at fs. Returns R peaks at the original rate."""
    n_leads, n = x.shape
    if n < 4:
        return np.zeros(0, dtype=np.int64)
    xc, fs_c = _to_canonical(x, fs)
    nc = xc.shape[1]
    sb = max(2, int(round(BLOCK_S / SUB_BLOCKS * fs_c)))  # sub-block, ~0.5 s
    b = SUB_BLOCKS * sb  # block, ~2 s
    d, d2, e = _lead_features(xc, fs_c)
    peak, floor = _block_stats(e, b)
    base_c = uniform_filter1d(xc, int(round(0.3 * fs_c)) | 1, axis=1, mode="nearest")
    wander = _block_ptp(base_c, b)
    scale, q = _weights(peak, floor, wander)
    vf = _vf_mask(xc, fs_c, b, floor > VF_BUSY * peak)
    q[vf] = 0.0
    both = _expand(np.concatenate([1.0 / scale, q]), b, nc)
    inv, w = both[:n_leads], both[n_leads:]
    if n_leads > 1:
        w = w * _expand(_burst_weights(e, sb, scale, q), sb, nc)
    wsum = w.sum(axis=0)
    contrib = w * np.minimum(e * inv, NORM_CAP)
    num = contrib.sum(axis=0)
    f = num / np.maximum(wsum, 0.5)
    f[wsum < 0.05] = 0.0
    g = (w * d2 * inv).sum(axis=0) / np.maximum(wsum, 0.5)
    beats_c = _decide(f, g, fs_c, (e, inv, w) if n_leads > 1 else None)
    if beats_c.size == 0:
        return beats_c
    return _refine(x, fs, xc, base_c, fs_c, beats_c, contrib)


def _refine(x, fs, xc, base_c, fs_c, beats_c, contrib) -> np.ndarray:
    """Place each beat on the R extremum of its best lead, at the original rate."""
    n_leads, n = x.shape
    nc = xc.shape[1]
    best = np.argmax(contrib[:, beats_c], axis=0) if n_leads > 1 else np.zeros(beats_c.size, int)
    # canonical rate: extremum of the baseline-removed lead within +-60 ms of the feature peak
    hw = max(1, int(round(0.06 * fs_c)))
    offs = np.arange(-hw, hw + 1)
    idx = np.clip(beats_c[:, None] + offs[None, :], 0, nc - 1)
    seg = xc[best[:, None], idx] - base_c[best[:, None], idx]
    k = np.argmax(np.abs(seg), axis=1)
    pc = idx[np.arange(idx.shape[0]), k]
    sign = np.sign(seg[np.arange(seg.shape[0]), k])
    sign[sign == 0] = 1
    baseline = base_c[best, pc]
    # original rate: extremum of the same polarity within +-1.5 canonical samples
    ratio = fs / fs_c
    centre = np.round(pc * ratio).astype(np.int64)
    hw2 = max(1, int(np.ceil(1.5 * ratio)))
    offs2 = np.arange(-hw2, hw2 + 1)
    idx2 = np.clip(centre[:, None] + offs2[None, :], 0, n - 1)
    raw = (x[best[:, None], idx2] - baseline[:, None]) * sign[:, None]
    r = idx2[np.arange(idx2.shape[0]), np.argmax(raw, axis=1)]
    return np.unique(r.astype(np.int64))


def detect_r_peaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices (sorted, unique, int64) at the original rate.

    Parameters
    ----------
    signal : (n_samples, n_leads) or (n_samples,) array in mV.
    fs : sampling rate in Hz (50 Hz - 20 kHz).
    """
    fs = float(fs)
    if not np.isfinite(fs) or fs <= 0:
        raise ValueError(f"sampling rate {fs!r} is not valid")
    x = np.asarray(signal)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"signal must be 1-D or (samples, leads), got shape {x.shape}")
    n, n_leads = x.shape
    if n == 0 or n_leads == 0:
        return np.zeros(0, dtype=np.int64)
    xt = np.ascontiguousarray(x.T, dtype=np.float32)
    bad = ~np.isfinite(xt)
    if bad.any():
        xt[bad] = 0.0
    core = int(min(CHUNK_S * fs, max(60 * fs, MAX_CHUNK_LEAD_SAMPLES // n_leads)))
    ov = int(OVERLAP_S * fs)
    if n <= core + 2 * ov:
        return _detect_chunk(xt, fs)
    n_chunks = -(-n // core)
    core = -(-n // n_chunks)  # equal chunks: no tiny last one
    out = []
    for a in range(0, n, core):
        b = min(n, a + core)
        lo, hi = max(0, a - ov), min(n, b + ov)
        p = _detect_chunk(xt[:, lo:hi], fs) + lo
        out.append(p[(p >= a) & (p < b)])
    peaks = np.concatenate(out)
    if peaks.size > 1:
        # a beat on a chunk edge can be found by both chunks a sample or two apart
        keep = np.concatenate([[True], np.diff(peaks) > int(0.1 * fs)])
        peaks = peaks[keep]
    return peaks
