"""Draw one recording with its beats and the token id of each beat written above it.

Used for the README picture. Matplotlib's object API with the Agg canvas is used directly
(no pyplot), so drawing never touches a global backend or a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

# ECG-paper colours: minor grid 0.04 s x 0.1 mV, major grid 0.2 s x 0.5 mV.
_MINOR, _MAJOR = "#f6d5d5", "#eaa5a5"
_TRACE, _BEAT, _TOKEN, _WORD = "#111111", "#c0392b", "#1f4e79", "#2a9d8f"


def _find_lead(name: str, lead_names: Sequence[str]) -> int | None:
    for i, n in enumerate(lead_names):
        if n == name:
            return i
    low = name.strip().lower()
    for i, n in enumerate(lead_names):
        if n.strip().lower() in (low, "ml" + low, "ecg " + low, "lead " + low):
            return i
    return None


def _draw_decoded(ax, t, x, fs, peaks, shown, words: np.ndarray, word_fs: float) -> None:
    """Each beat's decoded word over it, fitted by least squares (words are unit-energy)."""
    if words.ndim != 2 or words.shape[0] != peaks.size:
        return
    half = words.shape[1] // 2
    for j in shown:
        wav = words[j].astype(np.float64)
        if not np.any(wav):
            continue
        tt = peaks[j] / fs + (np.arange(wav.size) - half) / word_fs
        inside = (tt >= t[0]) & (tt <= t[-1])
        seg = np.interp(tt, t, x)
        c = wav - wav[inside].mean() if inside.any() else wav
        scale = float(np.dot(seg[inside] - seg[inside].mean(), c[inside])) / max(
            float(np.dot(c[inside], c[inside])), 1e-12
        )
        overlay = scale * c + seg[inside].mean()
        ax.plot(tt[inside], overlay[inside], color=_WORD, lw=1.1, alpha=0.85, zorder=2.5)


def _paper_grid(ax, x0: float, x1: float, y0: float, y1: float) -> None:
    minor_x = np.arange(np.floor(x0 / 0.04) * 0.04, x1 + 1e-9, 0.04)
    minor_y = np.arange(np.floor(y0 / 0.1) * 0.1, y1 + 1e-9, 0.1)
    for x in minor_x:
        major = abs(x / 0.2 - round(x / 0.2)) < 1e-6
        ax.axvline(x, color=_MAJOR if major else _MINOR, lw=0.6 if major else 0.3, zorder=0)
    for y in minor_y:
        major = abs(y / 0.5 - round(y / 0.5)) < 1e-6
        ax.axhline(y, color=_MAJOR if major else _MINOR, lw=0.6 if major else 0.3, zorder=0)


def plot_record_with_tokens(
    signal: np.ndarray,
    fs: float,
    r_peaks: Sequence[int] | np.ndarray,
    tokens: Sequence[Sequence[object]],
    lead_names: Sequence[str],
    out_png: str,
    leads: Sequence[str] = ("II",),
    seconds: float = 10.0,
    title: str | None = None,
    decoded: Sequence[np.ndarray] | None = None,
    decoded_fs: float = 100.0,
) -> None:
    """Write a PNG of the first `seconds` of `signal` for each lead in `leads`.

    `signal` is (samples, leads) in mV; `r_peaks` are sample indices; `tokens[i]` lists the
    word ids of lead `lead_names[i]`, one per beat of `r_peaks`. A requested lead that the
    record lacks is skipped; if none is present the first lead is drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim == 1:
        signal = signal[:, None]
    if signal.shape[1] != len(lead_names):
        raise ValueError(f"{signal.shape[1]} signal columns but {len(lead_names)} lead names")
    if len(tokens) != len(lead_names):
        raise ValueError(f"tokens has {len(tokens)} leads, lead_names {len(lead_names)}")
    peaks = np.asarray(r_peaks, dtype=np.int64).reshape(-1)
    for name, row in zip(lead_names, tokens, strict=True):
        if len(row) != peaks.size:
            raise ValueError(f"lead {name}: {len(row)} tokens for {peaks.size} beats")
    if fs <= 0 or seconds <= 0:
        raise ValueError("fs and seconds must be positive")

    chosen = [i for i in (_find_lead(n, lead_names) for n in leads) if i is not None]
    chosen = list(dict.fromkeys(chosen)) or [0]
    n = min(signal.shape[0], max(1, int(round(seconds * fs))))
    t = np.arange(n) / fs
    shown = np.flatnonzero((peaks >= 0) & (peaks < n))

    width = float(np.clip(1.6 * n / fs, 6.0, 24.0))
    fig = Figure(figsize=(width, 2.3 * len(chosen) + (0.4 if title else 0.0)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
    for ax, li in zip(axes, chosen, strict=True):
        x = signal[:n, li]
        lo, hi = (float(np.min(x)), float(np.max(x))) if n else (0.0, 0.0)
        span = max(hi - lo, 0.5)
        y0, y1 = lo - 0.1 * span, hi + 0.35 * span  # headroom for the token labels
        _paper_grid(ax, 0.0, n / fs, y0, y1)
        ax.plot(t, x, color=_TRACE, lw=0.9, zorder=2)
        if shown.size:
            ax.plot(t[peaks[shown]], x[peaks[shown]], "v", color=_BEAT, ms=4, zorder=3)
        # Beat boundaries: the midpoints between neighbouring R peaks (the tokenizer's window).
        for a, b in zip(peaks[:-1], peaks[1:]):
            mid = 0.5 * (a + b)
            if 0 <= mid < n:
                ax.axvline(mid / fs, color=_BEAT, lw=0.5, ls=":", alpha=0.6, zorder=1)
        if decoded is not None:
            _draw_decoded(ax, t, x, fs, peaks, shown, np.asarray(decoded[li]), decoded_fs)
        w = max(1, int(0.06 * fs))
        for j in shown:
            p = int(peaks[j])
            top = float(np.max(x[max(0, p - w) : p + w + 1]))
            ax.annotate(
                str(tokens[li][j]),
                (p / fs, top),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color=_TOKEN,
                fontweight="bold",
                zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        ax.set_xlim(0.0, n / fs)
        ax.set_ylim(y0, y1)
        ax.set_ylabel(f"{lead_names[li]} (mV)")
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out_png, format="png")
