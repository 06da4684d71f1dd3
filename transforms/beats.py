"""Per-beat quality flags and lead-off masks (plain NumPy/SciPy).

`beat_quality(signal, fs, r_peaks)` returns one uint8 per beat, a bitwise OR of:

* `FLAG_NOISE`: no lead is clean around the beat: in every lead the broadband residual
  (signal minus its 40 ms moving average, outside the QRS) is large against the QRS;
* `FLAG_SATURATED`: some lead sits on its rail (its extreme value, repeated) inside the
  beat window: the amplifier or ADC clipped;
* `FLAG_FLAT`: some lead is flat (lead-off or disconnected) over most of the window.

The beat window is [R - 250 ms, R + 400 ms], cut short at the record's edges; the first
and last beats are flagged like any other.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.ndimage import maximum_filter1d, minimum_filter1d, uniform_filter1d

FLAG_NOISE = 1
FLAG_SATURATED = 2
FLAG_FLAT = 4
FLAG_NOISE_MASK = FLAG_NOISE | FLAG_SATURATED | FLAG_FLAT  # any flag: beat is unreliable

PRE_S, POST_S = 0.25, 0.40
QRS_S = 0.06  # half-width of the QRS part of the window
FLAT_MV = 0.01  # peak-to-peak below this over FLAT_WINDOW_S = lead off / flat
FLAT_WINDOW_S = 0.20
NOISE_RATIO = 0.12  # residual RMS / QRS peak-to-peak above which a lead is noisy
SAT_RUN_S = 0.01  # a rail has to be held this long to count as clipping


def _as_2d(signal: np.ndarray) -> np.ndarray:
    x = np.asarray(signal, dtype=np.float32)
    return x[:, None] if x.ndim == 1 else x


def _lead_major(signal: np.ndarray) -> np.ndarray:
    """(leads, samples) C-contiguous float32. Every pass below runs along contiguous
    rows: NumPy reductions along axis 0 of a (samples, 12) array are ~30x slower."""
    return np.ascontiguousarray(_as_2d(signal).T)


def _blocks(xt: np.ndarray, w: int) -> np.ndarray:
    """(leads, samples) -> consecutive blocks of w samples, (leads, blocks, w); the last
    block is padded with the last sample."""
    n_leads, n = xt.shape
    nb = -(-n // w)
    pad = nb * w - n
    if pad:
        xt = np.concatenate([xt, np.repeat(xt[:, -1:], pad, axis=1)], axis=1)
    return xt.reshape(n_leads, nb, w)


def _flat_blocks(xt: np.ndarray, w: int, flat_mv: float) -> np.ndarray:
    """(leads, blocks) bool: the block's peak-to-peak is under flat_mv (see `_blocks`).

    Peak-to-peak over every block (max and min along rows of ~50 samples) cost ~0.18 ms
    on a 10 s 12-lead record. The difference between two samples of a block is a lower
    bound of its peak-to-peak (also after float32 rounding, which is monotone), so a
    block with two samples flat_mv apart is not flat; four such pairs clear ~97% of the
    blocks of real ECGs, and only the rest get the exact peak-to-peak.
    """
    blocks = _blocks(xt, w)
    if w < 4:
        return blocks.max(axis=2) - blocks.min(axis=2) < flat_mv
    h = w // 2
    pairs = ((0, h), (h // 2, h + h // 2), (0, w - 1), (h, w - 1))
    bound = np.abs(blocks[:, :, pairs[0][0]] - blocks[:, :, pairs[0][1]])
    for a, b in pairs[1:]:
        np.maximum(bound, np.abs(blocks[:, :, a] - blocks[:, :, b]), out=bound)
    maybe = ~(bound >= flat_mv)  # NaN stays a candidate, as NaN < flat_mv is False below
    low = np.zeros(bound.shape, dtype=bool)
    if maybe.any():
        sel = blocks[maybe]
        low[maybe] = sel.max(axis=1) - sel.min(axis=1) < flat_mv
    return low


def lead_off_mask(signal: np.ndarray, fs: float, flat_mv: float = FLAT_MV) -> np.ndarray:
    """(samples, leads) bool: True where a lead is flat or not finite.

    Flat means a peak-to-peak under `flat_mv` mV within a 100 ms block and in one of its
    neighbours. Lead-off electrodes read a constant or near-constant value (often 0 or
    a rail); a real ECG moves by far more than 10 uV in 200 ms.
    """
    return _lead_off_rows(_lead_major(signal), fs, flat_mv).T


def _lead_off_rows(
    xt: np.ndarray, fs: float, flat_mv: float = FLAT_MV, finite: np.ndarray | None = None
) -> np.ndarray:
    """`lead_off_mask` on a (leads, samples) array, returned (leads, samples). `finite` is
    np.isfinite(xt) when the caller has it."""
    n = xt.shape[1]
    finite = np.isfinite(xt) if finite is None else finite
    all_finite = bool(finite.all())
    xf = xt if all_finite else np.where(finite, xt, 0.0)
    w = max(1, int(round(FLAT_WINDOW_S * fs / 2)))
    low = _flat_blocks(xf, w, flat_mv)  # (leads, blocks)
    if not low.any():  # the common case: nothing flat, no per-sample work
        return np.zeros(xt.shape, dtype=bool) if all_finite else ~finite
    # Flat over 200 ms: this block and the previous or the next one are flat. Judged
    # per block; the last w samples have no next block and keep their own flatness.
    prev = np.concatenate([low[:, :1], low[:, :-1]], axis=1)
    nxt = np.concatenate([low[:, 1:], low[:, -1:]], axis=1)
    off = np.repeat(low & (prev | nxt), w, axis=1)[:, :n]
    own = np.repeat(low, w, axis=1)[:, :n]
    if n > w:
        off[:, n - w :] = own[:, n - w :]
    else:
        off = own
    return off | ~finite


def saturation_mask(signal: np.ndarray, fs: float) -> np.ndarray | None:
    """(samples, leads) bool: True where a lead holds its own extreme value for at least
    SAT_RUN_S (clipping), or None when no lead does. A lead that never repeats its
    extreme is never flagged."""
    sat = _saturation_rows(_lead_major(signal), fs)
    return None if sat is None else sat.T


def _saturation_rows(
    xt: np.ndarray, fs: float, finite: np.ndarray | None = None
) -> np.ndarray | None:
    """`saturation_mask` on a (leads, samples) array, returned (leads, samples). `finite`
    is np.isfinite(xt) when the caller has it."""
    run = max(2, int(round(SAT_RUN_S * fs)))
    fin = np.isfinite(xt) if finite is None else finite
    if fin.all():
        at_hi = xt == xt.max(axis=1, keepdims=True)
        at_lo = xt == xt.min(axis=1, keepdims=True)
    else:  # rails are the extremes of the finite samples
        at_hi = (xt == np.where(fin, xt, -np.inf).max(axis=1, keepdims=True)) & fin
        at_lo = (xt == np.where(fin, xt, np.inf).min(axis=1, keepdims=True)) & fin
    # Only leads that touch a rail `run` times need the filters. Counted from the few
    # True positions (np.count_nonzero along an axis is ~3x slower on 12 leads).
    n_leads, n = xt.shape
    candidates = [
        (lead, at[lead])
        for at in (at_hi, at_lo)
        for lead in np.flatnonzero(np.bincount(np.flatnonzero(at) // n, minlength=n_leads) >= run)
    ]
    if not candidates:
        return None
    out = np.zeros(xt.shape, dtype=bool)
    for lead, at in candidates:
        held = minimum_filter1d(at.view(np.uint8), run) > 0
        out[lead] |= maximum_filter1d(held.view(np.uint8), run) > 0
    return out


def _window_sums(v: np.ndarray, bounds: np.ndarray, dtype) -> np.ndarray:
    """Sums of v (leads, samples) between consecutive bounds of each beat.

    `bounds` (beats, m) holds non-decreasing sample indices per beat; the result
    (beats, leads, m - 1) holds the sums over [bounds[:, j], bounds[:, j + 1]) in `dtype`.
    One np.add.reduceat sums every window directly (~60 us on a 10 s 12-lead record),
    where a float64 prefix sum (np.cumsum runs at ~4 ns a sample) cost ~0.3 ms a pass.
    Windows of different beats may overlap; an empty window sums to 0.
    """
    n_beats, m = bounds.shape
    if n_beats and int(bounds.max()) >= v.shape[1]:  # reduceat's indices must lie inside v
        v = np.concatenate([v, np.zeros((v.shape[0], 1), dtype=v.dtype)], axis=1)
    sums = np.add.reduceat(v, bounds.ravel(), axis=1, dtype=dtype)
    sums = sums.reshape(v.shape[0], n_beats, m)[:, :, : m - 1].transpose(1, 0, 2)
    empty = bounds[:, 1:] <= bounds[:, :-1]  # reduceat gives v[lo] for an empty [lo, lo)
    return np.where(empty[:, None, :], 0, sums)


class _Passes(NamedTuple):
    """The per-sample passes of `beat_quality` over (rows, samples) lead-major signals:
    every row (lead) on its own, so rows of several records can share one call."""

    xf: np.ndarray  # the signal, non-finite samples as 0
    off: np.ndarray | None  # flat or non-finite samples, or None where there are none
    sat: np.ndarray | None  # clipped samples, or None where there are none
    resid: np.ndarray  # squared broadband residual (signal minus its 40 ms mean)


def _passes(xt: np.ndarray, fs: float) -> _Passes:
    finite = np.isfinite(xt)
    all_finite = bool(finite.all())
    off = _lead_off_rows(xt, fs, finite=finite)
    xf = xt if all_finite else np.where(finite, xt, np.float32(0.0))
    resid = xf - uniform_filter1d(xf, max(1, int(round(0.04 * fs))) | 1, axis=1)
    resid *= resid
    return _Passes(xf, off if off.any() else None, _saturation_rows(xt, fs, finite=finite), resid)


def _rows(passes: _Passes, lo: int, hi: int) -> _Passes:
    """The passes of rows [lo, hi) (one record's leads)."""
    off, sat = passes.off, passes.sat
    return _Passes(
        passes.xf[lo:hi],
        None if off is None or not off[lo:hi].any() else off[lo:hi],
        None if sat is None or not sat[lo:hi].any() else sat[lo:hi],
        passes.resid[lo:hi],
    )


def beat_quality(signal: np.ndarray, fs: float, r_peaks: np.ndarray) -> np.ndarray:
    """uint8 flags per beat (see the module doc). Costs a few passes over the record."""
    xt = _lead_major(signal)
    r = np.asarray(r_peaks, dtype=np.int64).ravel()
    if r.size == 0 or xt.shape[1] == 0:
        return np.zeros(r.size, dtype=np.uint8)
    return _flags(_passes(xt, fs), fs, r)


def beat_quality_many(stack: np.ndarray, fs: float, r_peaks: list[np.ndarray]) -> list[np.ndarray]:
    """`beat_quality` of several records of one shape, given lead-major as (records,
    leads, samples) float32: the per-sample passes run once over all their leads."""
    n_rec, n_leads, n = stack.shape
    peaks = [np.asarray(r, dtype=np.int64).ravel() for r in r_peaks]
    if n == 0:
        return [np.zeros(r.size, dtype=np.uint8) for r in peaks]
    passes = _passes(stack.reshape(n_rec * n_leads, n), fs)
    return [
        _flags(_rows(passes, i * n_leads, (i + 1) * n_leads), fs, r)
        if r.size
        else np.zeros(0, np.uint8)
        for i, r in enumerate(peaks)
    ]


def _flags(passes: _Passes, fs: float, r: np.ndarray) -> np.ndarray:
    """One record's flags per beat from its passes; `r` non-empty."""
    xf = passes.xf
    flags = np.zeros(r.size, dtype=np.uint8)
    n_leads, n = xf.shape
    r = np.minimum(np.maximum(r, 0), n - 1)  # np.clip: ~15 us of Python per call
    pre, post, q = (int(round(v * fs)) for v in (PRE_S, POST_S, QRS_S))
    lo, hi = np.maximum(r - pre, 0), np.minimum(r + post + 1, n)
    qlo, qhi = np.maximum(r - q, 0), np.minimum(r + q + 1, n)
    length = (hi - lo)[:, None].astype(np.float64)
    whole = np.stack([lo, hi], axis=1)  # each beat's window

    if passes.off is not None:  # flat samples per window: exact counts
        flat_frac = _window_sums(passes.off, whole, np.int64)[:, :, 0] / length  # (beats, leads)
        flags[(flat_frac > 0.5).any(axis=1)] |= FLAG_FLAT
    else:  # the common case: no per-sample work
        flat_frac = np.zeros((r.size, n_leads))

    if passes.sat is not None:
        flags[(_window_sums(passes.sat, whole, np.int64) > 0).any(axis=(1, 2))] |= FLAG_SATURATED

    # noise: broadband residual outside the QRS against the QRS peak-to-peak
    # squares summed in float64 before and after the QRS: [lo, qlo) and [qhi, hi)
    parts = _window_sums(passes.resid, np.stack([lo, qlo, qhi, hi], axis=1), np.float64)
    outside_sum = parts[:, :, 0] + parts[:, :, 2]
    outside_n = np.maximum(length - (qhi - qlo)[:, None], 1.0)
    rms = np.sqrt(np.maximum(outside_sum, 0.0) / outside_n)
    idx = np.minimum(np.maximum(r[:, None] + np.arange(-q, q + 1)[None, :], 0), n - 1)
    seg = xf[:, idx]  # (leads, beats, qrs window)
    qrs_ptp = (seg.max(axis=2) - seg.min(axis=2)).T
    noisy = rms > NOISE_RATIO * np.maximum(qrs_ptp, 1e-6)
    clean_lead = ~noisy & (flat_frac <= 0.5)
    flags[~clean_lead.any(axis=1)] |= FLAG_NOISE
    return flags
