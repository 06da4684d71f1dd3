"""Scoring beat detections against reference annotations (pure functions).

The rule (issue 4), which is how the MIT-BIH targets were measured:

* whole records, from sample 0 to the end;
* reference beats are the annotations whose symbol is in `BEAT_SYMBOLS`;
* a detection matches a reference beat within +-`window` seconds, one to one;
* reference beats and detections inside ventricular flutter/fibrillation episodes
  (from a `[` annotation to the next `]`, inclusive; to the end when `]` is missing)
  are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BEAT_SYMBOLS = frozenset(
    ["N", "L", "R", "B", "A", "a", "J", "S", "V", "r", "F", "e", "j", "n", "E", "/", "f", "Q", "?"]
)
VF_START, VF_END = "[", "]"


@dataclass(frozen=True)
class Score:
    """Matching counts; `se` and `ppv` are fractions (1.0 when undefined)."""

    tp: int = 0
    fn: int = 0
    fp: int = 0

    def __add__(self, other: Score) -> Score:
        return Score(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp)

    @property
    def se(self) -> float:
        """Sensitivity TP / (TP + FN)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def ppv(self) -> float:
        """Positive predictivity TP / (TP + FP)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0


def match_beats(ref, det, tol: float) -> tuple[int, int, int]:
    """One-to-one matching of detections to reference beats within +-tol (same units).

    Returns (tp, fn, fp). Both inputs are sorted first; duplicates count separately.
    Each reference beat, in time order, takes the earliest unused detection within its
    window. Every window is an interval and the windows move forward with the
    reference, so this greedy choice gives the largest possible number of matches.
    """
    if tol < 0:
        raise ValueError("tolerance must be >= 0")
    r = np.sort(np.asarray(ref, dtype=np.float64).ravel())
    d = np.sort(np.asarray(det, dtype=np.float64).ravel())
    lo = np.searchsorted(d, r - tol, side="left")  # first detection not too early
    hi = np.searchsorted(d, r + tol, side="right")  # first detection too late
    tp = 0
    nxt = 0  # detections before this index are used or passed
    for k in range(r.size):
        j = max(int(lo[k]), nxt)
        if j < hi[k]:
            tp += 1
            nxt = j + 1
    return tp, int(r.size - tp), int(d.size - tp)


def vf_episodes(samples, symbols, n_samples: int | None = None) -> list[tuple[int, int]]:
    """[start, end] sample ranges of ventricular flutter/fibrillation episodes."""
    out: list[tuple[int, int]] = []
    start = None
    for s, sym in zip(samples, symbols):
        if sym == VF_START and start is None:
            start = int(s)
        elif sym == VF_END and start is not None:
            out.append((start, int(s)))
            start = None
    if start is not None:
        end = int(n_samples - 1) if n_samples is not None else int(np.iinfo(np.int64).max)
        out.append((start, end))
    return out


def outside(points, episodes: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask: True for points outside every [start, end] episode."""
    p = np.asarray(points)
    keep = np.ones(p.shape, dtype=bool)
    for a, b in episodes:
        keep &= ~((p >= a) & (p <= b))
    return keep


def reference_beats(samples, symbols) -> np.ndarray:
    """Sample indices of the annotations that are beats."""
    s = np.asarray(samples, dtype=np.int64)
    m = np.fromiter((sym in BEAT_SYMBOLS for sym in symbols), dtype=bool, count=len(s))
    return s[m]


def score_record(
    ann_samples, ann_symbols, detections, fs: float, window: float = 0.15, n_samples=None
) -> Score:
    """Score one record's detections against its annotations by the rule above."""
    episodes = vf_episodes(ann_samples, ann_symbols, n_samples)
    ref = reference_beats(ann_samples, ann_symbols)
    det = np.asarray(detections, dtype=np.int64)
    ref = ref[outside(ref, episodes)]
    det = det[outside(det, episodes)]
    return Score(*match_beats(ref, det, window * float(fs)))
