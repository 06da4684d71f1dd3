"""The ECG language: heartbeat words from a learned codebook, plus rhythm words.

Vocabulary layout (ids are stable within a tokenizer version):

    0 PAD   1 SEP   2 UNK (noisy or unreadable beat)   3 CLS   4 MASK
    5 .. 5+R-1          rhythm words: the RR interval before a beat, in R bins
    5+R .. 5+R+K-1      morphology words: codebook entry k of K
    5+R+K .. +A-1       atrial words: atrial codebook entry a of A (tokenizers that have one)

A record's `tokens` are, per lead, one morphology word (or UNK) per beat, aligned with
its `r_peaks`; its `atrial_tokens` likewise one atrial word per beat (what the atria do
before the beat: a P wave, fibrillatory waves, a flat line; `transforms.atrial`). Its
`rhythm` is one rhythm word per beat. The full lead-major sentence (`sentence`, with
`sentence_lead` and `sentence_beat` positions) is

    CLS  rhythm words  SEP  lead-0 words  SEP  lead-1 words  SEP ...

where a lead's words are, beat by beat, its atrial word (if any) then its morphology word:
the order in which a P wave and a QRS complex happen.

How the tokenizer sees a beat (`beat_view`): the record is band-passed and resampled to
100 Hz (`transforms.windows`), low-passed at `lowpass_hz`, cut into HeartLang's 96-sample
RR-masked windows, each lead's window re-centred on its own largest deflection within
`align_samples` of the R peak, and scaled to unit energy (`beat_norm: "l2"`: a word is a
beat's shape; its size is not part of it). These settings live in `tokenizer.json`.

The artifact is a directory: `codebook.npy`, `basis.npy` and `atrial_codebook.npy` where
used (never pickled), and `tokenizer.json` (rate, window, filters, vocabulary, format
version). `tokenizer_id` is a hash of them all, checked every time the artifact is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import threading
from dataclasses import dataclass

import numpy as np

from ecgtok.transforms import windows as W
from ecgtok.transforms.atrial import (
    ATRIAL_END,
    ATRIAL_LEN,
    ATRIAL_START,
    atrial_windows,
    atrial_windows_many,
)

FORMAT_VERSION = 1
PAD, SEP, UNK, CLS, MASK = 0, 1, 2, 3, 4
N_SPECIAL = 5
# RR bins: log-spaced edges from 0.24 s (250 bpm) to 2.0 s (30 bpm); bin 0 = no previous beat.
RR_EDGES_S = np.geomspace(0.24, 2.0, 15)
N_RHYTHM = len(RR_EDGES_S) + 2
CODEBOOK_FILE = "codebook.npy"
BASIS_FILE = "basis.npy"
ATRIAL_FILE = "atrial_codebook.npy"
# Defaults of the beat view for newly fitted tokenizers (older artifacts lack the keys and
# keep the plain view: no low-pass, no alignment, no normalisation, filter then resample).
DEFAULT_VIEW = {
    "lowpass_hz": 25.0,
    "align_samples": 4,
    "beat_norm": "zl2",
    "resample_first": True,
}
# Windows per codebook product (see Tokenizer._nearest): 128 x 4,096 float32 scores, 2 MB,
# this host's L2 (in-process over 1,100 records, three interleaved rounds: 3.99-4.13 ms a
# record with blocks of 256, 3.78-3.96 with 128).
ASSIGN_BLOCK = 128

PLAIN_VIEW = {
    "lowpass_hz": None,
    "align_samples": 0,
    "beat_norm": "none",
    "resample_first": False,
}
META_FILE = "tokenizer.json"


class ArtifactError(ValueError):
    """An artifact is missing, tampered with, or of another format version."""


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        # Local files without Beam: the guarded child loads the tokenizer, and importing
        # Beam there costs 1.5 s of every worker's start-up for nothing.
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from exc
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, mime_type="application/octet-stream") as f:
            return f.read()
    except Exception as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc


def _write_bytes(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        f.write(data)


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if "://" in folder else f"{folder.rstrip('/')}/{name}"


def content_hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


@dataclass
class Tokenizer:
    """A fitted codebook with the settings it was fitted under."""

    codebook: np.ndarray  # (K, WINDOW_LEN) float32
    meta: dict
    # (d, WINDOW_LEN) orthonormal rows spanning the codebook, or None. The words then lie
    # in a d-dimensional subspace and the nearest word is found there, exactly.
    basis: np.ndarray | None = None
    # (A, ATRIAL_LEN) float32 atrial words, or None (tokenizers without atrial words).
    atrial_codebook: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.atrial_offset + self.atrial_size

    @property
    def morph_offset(self) -> int:
        return N_SPECIAL + N_RHYTHM

    @property
    def atrial_offset(self) -> int:
        return self.morph_offset + self.codebook.shape[0]

    @property
    def atrial_size(self) -> int:
        return 0 if self.atrial_codebook is None else int(self.atrial_codebook.shape[0])

    @property
    def tokenizer_id(self) -> str:
        return self.meta["tokenizer_id"]

    @property
    def view(self) -> dict:
        return {k: self.meta.get(k, PLAIN_VIEW[k]) for k in PLAIN_VIEW}

    def beat_windows(self, signal: np.ndarray, fs: float, r_peaks: np.ndarray) -> np.ndarray:
        """Beats (beats, leads, 96) as this tokenizer sees them (see `beat_view`)."""
        return beat_view(signal, fs, r_peaks, self.view)

    # ---- encoding -------------------------------------------------------------------
    def assign(self, beats: np.ndarray) -> np.ndarray:
        """Nearest codebook entry for each row of `beats` (N, WINDOW_LEN), vectorised."""
        if beats.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        basis, codebook = self._search_arrays()
        x = np.asarray(beats, dtype=np.float32)
        if basis is not None:
            # Words lie in the span of the basis rows B, so x.c = (x B^T).(c B^T): the
            # same nearest word, found with d instead of 96 multiply-adds per pair. The
            # basis has a last column of zeros, for the -1 of `_nearest`.
            x = x @ basis
            x[:, -1] = -1.0
        else:
            x = _with_minus_one(x)
        return self._nearest(x, codebook, "_scores")

    def _nearest(self, x: np.ndarray, codebook: np.ndarray, buffer: str) -> np.ndarray:
        """argmin_c |x - c|^2 per row of x, as argmax x.c - |c|^2 / 2 (the same numbers
        scaled by -2, so the same winner, ties included).

        `x` ends with a column of -1 and `codebook` (d + 1, K) with a row of |c|^2 / 2,
        so one product gives the scores: the product's last multiply-add subtracts
        |c|^2 / 2 from x.c with one rounding, as a separate subtraction would (the same
        scores, bit for bit, on this project's BLAS), without another pass over the
        (N, K) scores (0.84 -> 0.73 ms for a 12-lead record's 156 windows at K = 4,096).

        Rows go through in blocks of at most ASSIGN_BLOCK, each product written into
        one (rows, K) buffer kept with the tokenizer: a fresh (N, K) array per call
        page-faults more than the product costs (1.9 -> 0.7 ms for 144 windows at K =
        2048), and a block's scores stay in cache for the argmax (a batch of 16
        records' 2,500 windows at once: 1.6 ms a record instead of 1.0). Blocks are of
        equal size, so none is tiny: each row's product is the same BLAS kernel's
        whatever the batch.
        """
        n, k = x.shape[0], codebook.shape[1]
        n_blocks = -(-n // ASSIGN_BLOCK)
        size = -(-n // n_blocks)
        buffers = self.__dict__.setdefault("_buffers", {})
        key = (buffer, threading.get_ident())  # one per thread: never shared mid-search
        scores = buffers.get(key)
        if scores is None or scores.shape[0] < size or scores.shape[1] != k:
            scores = buffers[key] = np.empty((size, k), dtype=np.float32)
        out = np.empty(n, dtype=np.int64)
        for a in range(0, n, size):
            block = scores[: min(size, n - a)]
            np.matmul(x[a : a + size], codebook, out=block)
            np.argmax(block, axis=1, out=out[a : a + size])
        return out

    def _search_arrays(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(basis transposed with a column of zeros, or None; the codebook transposed in
        the search space with a row of half its squared norms), made once per tokenizer.
        See `_nearest`."""
        cached = self.__dict__.get("_search")
        if cached is None:
            c = np.asarray(self.codebook, dtype=np.float32)
            basis = None
            if self.basis is not None:
                basis_t = np.asarray(self.basis, dtype=np.float32).T
                c = c @ np.ascontiguousarray(basis_t)  # the words' coordinates in the subspace
                basis = np.zeros((basis_t.shape[0], basis_t.shape[1] + 1), dtype=np.float32)
                basis[:, :-1] = basis_t
            cached = (basis, _with_half_norms(c))
            self.__dict__["_search"] = cached
        return cached

    def encode_windows(self, windows: np.ndarray, noisy: np.ndarray | None = None) -> np.ndarray:
        """Word ids (leads, beats) for windows (beats, leads, WINDOW_LEN); noisy beats -> UNK."""
        n_beats, n_leads, _ = windows.shape
        codes = self.assign(windows.reshape(-1, W.WINDOW_LEN)).reshape(n_beats, n_leads)
        words = (codes + self.morph_offset).T.copy()
        if noisy is not None and noisy.size:
            words[:, np.asarray(noisy, dtype=bool)] = UNK
        return words

    def decode(self, tokens) -> np.ndarray:
        """Centroid waveforms (..., WINDOW_LEN) for morphology word ids; zeros for others."""
        t = np.asarray(tokens, dtype=np.int64)
        k = t - self.morph_offset
        valid = (k >= 0) & (k < self.codebook.shape[0])
        out = np.zeros(t.shape + (W.WINDOW_LEN,), dtype=np.float32)
        out[valid] = self.codebook[k[valid]]
        return out

    @staticmethod
    def rhythm_words(r_peaks: np.ndarray, fs: float) -> np.ndarray:
        """One rhythm word per beat: the RR interval before it, binned (first beat: bin 0)."""
        r = np.asarray(r_peaks, dtype=np.float64)
        words = np.full(r.shape, N_SPECIAL, dtype=np.int64)
        if r.size > 1:
            rr = np.diff(r) / fs
            words[1:] = N_SPECIAL + 1 + np.digitize(rr, RR_EDGES_S)
        return words

    def encode(
        self, signal: np.ndarray, fs: float, r_peaks: np.ndarray, noisy: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(morphology words (leads, beats), rhythm words (beats,)) for one recording."""
        words, rhythm, _ = self.encode_beats(signal, fs, r_peaks, noisy)
        return words, rhythm

    def encode_beats(
        self, signal: np.ndarray, fs: float, r_peaks: np.ndarray, noisy: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(morphology words (leads, beats), rhythm words (beats,), atrial words (leads,
        beats), None for a tokenizer without atrial words) for one recording."""
        has_atrial = self.atrial_codebook is not None
        wins, atrial_wins = view_windows(signal, fs, r_peaks, self.view, has_atrial)
        if wins.shape[0] == 0:
            empty = np.zeros((wins.shape[1], 0), dtype=np.int64)
            return empty, np.zeros(0, dtype=np.int64), empty.copy() if has_atrial else None
        words = self.encode_windows(wins, noisy)
        atrial = self.encode_atrial(atrial_wins, noisy) if has_atrial else None
        return words, self.rhythm_words(r_peaks, fs), atrial

    def encode_beats_many(
        self,
        signals: list[np.ndarray],
        fs: float,
        r_peaks: list[np.ndarray],
        noisy: list[np.ndarray],
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """`encode_beats` of several recordings of one shape and rate, each step run once
        for all of them (one filter pass over all leads, one cut of all beats, one
        codebook search): the same words as one recording at a time, with less per-call
        cost."""
        has_atrial = self.atrial_codebook is not None
        n_leads = signals[0].shape[1]
        clean = view_signals(signals, fs, self.view)  # (n, recordings, leads)
        r100 = [W.to_window_rate(r, fs) for r in r_peaks]
        counts = [r.size for r in r100]
        all_noisy = np.concatenate(noisy).astype(bool)
        wins = shape_windows(W.beat_windows_many(clean, r100), self.view)
        words = self.encode_windows(wins, all_noisy)
        atrial = None
        if has_atrial:
            atrial = self.encode_atrial(atrial_windows_many(clean, r100), all_noisy)
        out = []
        start = 0
        for count, r in zip(counts, r_peaks):
            stop = start + count
            if count == 0:
                empty = np.zeros((n_leads, 0), dtype=np.int64)
                out.append(
                    (empty, np.zeros(0, dtype=np.int64), empty.copy() if has_atrial else None)
                )
            else:
                out.append(
                    (
                        words[:, start:stop].copy(),
                        self.rhythm_words(r, fs),
                        None if atrial is None else atrial[:, start:stop].copy(),
                    )
                )
            start = stop
        return out

    def assign_atrial(self, windows: np.ndarray) -> np.ndarray:
        """Nearest atrial codebook entry for each row of `windows` (N, ATRIAL_LEN)."""
        if windows.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        x = _with_minus_one(np.asarray(windows, dtype=np.float32))
        return self._nearest(x, self._atrial_search_arrays(), "_atrial_scores")

    def encode_atrial(self, windows: np.ndarray, noisy: np.ndarray | None = None) -> np.ndarray:
        """Atrial word ids (leads, beats) for atrial windows (beats, leads, ATRIAL_LEN)."""
        n_beats, n_leads, length = windows.shape
        codes = self.assign_atrial(windows.reshape(-1, length)).reshape(n_beats, n_leads)
        words = (codes + self.atrial_offset).T.copy()
        if noisy is not None and noisy.size:
            words[:, np.asarray(noisy, dtype=bool)] = UNK
        return words

    def _atrial_search_arrays(self) -> np.ndarray:
        cached = self.__dict__.get("_atrial_search")
        if cached is None:
            cached = _with_half_norms(np.asarray(self.atrial_codebook, dtype=np.float32))
            self.__dict__["_atrial_search"] = cached
        return cached

    def decode_atrial(self, tokens) -> np.ndarray:
        """Atrial centroid windows (..., ATRIAL_LEN) for atrial word ids; zeros for others."""
        t = np.asarray(tokens, dtype=np.int64)
        k = t - self.atrial_offset
        valid = (k >= 0) & (k < self.atrial_size)
        out = np.zeros(t.shape + (ATRIAL_LEN,), dtype=np.float32)
        if self.atrial_codebook is not None:
            out[valid] = self.atrial_codebook[k[valid]]
        return out

    def inversion_map(self) -> np.ndarray:
        """(vocab_size,) int64: each morphology and atrial word -> the word nearest its
        negated centroid, every other id -> itself. A lead recorded upside down (a
        handheld device held the other way) has exactly negated windows, since the view
        aligns on |x| and scales by energy or peak-to-peak, so this map is what
        tokenizing the inverted lead gives, up to the codebook's resolution."""
        inv = np.arange(self.vocab_size, dtype=np.int64)
        k = self.codebook.shape[0]
        inv[self.morph_offset : self.morph_offset + k] = (
            self.assign(-np.asarray(self.codebook, dtype=np.float32)) + self.morph_offset
        )
        if self.atrial_codebook is not None:
            a = self.atrial_offset
            inv[a : a + self.atrial_size] = (
                self.assign_atrial(-np.asarray(self.atrial_codebook, dtype=np.float32)) + a
            )
        return inv

    # ---- artifact -------------------------------------------------------------------
    def save(self, folder: str) -> str:
        from apache_beam.io.filesystems import FileSystems

        FileSystems.mkdirs(folder) if not FileSystems.exists(folder) else None
        npy = _npy_bytes(self.codebook)
        meta = {k: v for k, v in self.meta.items() if k != "tokenizer_id"}
        parts = [npy]
        if self.basis is not None:
            meta["search_dims"] = int(self.basis.shape[0])
            parts.append(_npy_bytes(self.basis))
            _write_bytes(_join(folder, BASIS_FILE), parts[-1])
        else:
            meta.pop("search_dims", None)
        if self.atrial_codebook is not None:
            meta["atrial_codebook_size"] = self.atrial_size
            meta["atrial_offset"] = self.atrial_offset
            meta["atrial_window"] = [ATRIAL_START, ATRIAL_END]
            parts.append(_npy_bytes(self.atrial_codebook))
            _write_bytes(_join(folder, ATRIAL_FILE), parts[-1])
        else:
            for key in ("atrial_codebook_size", "atrial_offset", "atrial_window"):
                meta.pop(key, None)
        meta["tokenizer_id"] = content_hash(*parts, _canonical(meta))
        self.meta = meta
        _write_bytes(_join(folder, CODEBOOK_FILE), npy)
        _write_bytes(_join(folder, META_FILE), json.dumps(meta, indent=2).encode())
        return meta["tokenizer_id"]

    @classmethod
    def load(cls, folder: str) -> Tokenizer:
        """Load and verify a tokenizer directory (local or gs://). Never unpickles."""
        npy = _read_bytes(_join(folder, CODEBOOK_FILE))
        try:
            meta = json.loads(_read_bytes(_join(folder, META_FILE)))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{folder}/{META_FILE} is not valid JSON: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"tokenizer {folder} has format version {meta.get('format_version')!r}; "
                f"this ecgtok reads version {FORMAT_VERSION}"
            )
        claimed = meta.get("tokenizer_id")
        rest = {k: v for k, v in meta.items() if k != "tokenizer_id"}
        parts = [npy]
        basis_npy = atrial_npy = None
        if meta.get("search_dims"):
            basis_npy = _read_bytes(_join(folder, BASIS_FILE))
            parts.append(basis_npy)
        if meta.get("atrial_codebook_size"):
            atrial_npy = _read_bytes(_join(folder, ATRIAL_FILE))
            parts.append(atrial_npy)
        actual = content_hash(*parts, _canonical(rest))
        if claimed != actual:
            raise ArtifactError(
                f"tokenizer {folder} fails its content check (id {claimed!r}, content {actual!r}): "
                "the files were changed or mixed from two artifacts"
            )
        codebook = np.load(io.BytesIO(npy), allow_pickle=False).astype(np.float32)
        if codebook.ndim != 2 or codebook.shape[1] != W.WINDOW_LEN:
            raise ArtifactError(
                f"tokenizer {folder}: codebook shape {codebook.shape} is not (K, 96)"
            )
        basis = atrial = None
        if basis_npy is not None:
            basis = np.load(io.BytesIO(basis_npy), allow_pickle=False).astype(np.float32)
            if basis.ndim != 2 or basis.shape != (meta["search_dims"], W.WINDOW_LEN):
                raise ArtifactError(f"tokenizer {folder}: basis shape {basis.shape} is wrong")
        if atrial_npy is not None:
            atrial = np.load(io.BytesIO(atrial_npy), allow_pickle=False).astype(np.float32)
            if atrial.shape != (meta["atrial_codebook_size"], ATRIAL_LEN) or meta.get(
                "atrial_window"
            ) != [ATRIAL_START, ATRIAL_END]:
                raise ArtifactError(
                    f"tokenizer {folder}: atrial codebook {atrial.shape} or window "
                    f"{meta.get('atrial_window')} is not what this ecgtok reads"
                )
        return cls(codebook=codebook, meta=meta, basis=basis, atrial_codebook=atrial)


def beat_view(signal: np.ndarray, fs: float, r_peaks: np.ndarray, view: dict) -> np.ndarray:
    """Beat windows (beats, leads, 96) of a recording, preprocessed as `view` says.

    `view`: `lowpass_hz` (None or a cut-off applied at 100 Hz), `align_samples` (re-centre
    each lead's window on its largest |deflection| within that many samples of R; 0 = off),
    `beat_norm` ("l2": unit energy per window, "zl2": zero mean then unit energy, "none"),
    `resample_first` (resample to 100 Hz, then band- and low-pass in one pass; the
    cheaper order, `windows.resample_then_filter`).
    """
    return view_windows(signal, fs, r_peaks, view)[0]


def view_windows(
    signal: np.ndarray, fs: float, r_peaks: np.ndarray, view: dict, atrial: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """(beat windows (beats, leads, 96) as `beat_view` makes them, atrial windows (beats,
    leads, ATRIAL_LEN) of the same 100 Hz view, or None unless `atrial`)."""
    clean = view_signal(signal, fs, view)
    r100 = W.to_window_rate(r_peaks, fs)
    wins = shape_windows(W.beat_windows(clean, r100), view)
    return wins, atrial_windows(clean, r100) if atrial else None


def view_signal(signal: np.ndarray, fs: float, view: dict) -> np.ndarray:
    """The recording (n, leads) at 100 Hz, filtered as `view` says (see `beat_view`)."""
    lp = view.get("lowpass_hz")
    if view.get("resample_first"):
        return W.resample_then_filter(signal, fs, lp)  # low-pass in the same pass
    clean = W.clean_for_windows(signal, fs)  # the view of tokenizers fitted before that
    if lp and clean.shape[0] > 30:
        # Same zero-phase order-4 Butterworth, designed once per cut-off (bit for bit).
        clean = W.lowpass(clean, float(lp))
    return clean


def _with_minus_one(x: np.ndarray) -> np.ndarray:
    """(N, d) float32 -> (N, d + 1) with a last column of -1 (see Tokenizer._nearest)."""
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = x
    out[:, -1] = -1.0
    return out


def _with_half_norms(words: np.ndarray) -> np.ndarray:
    """Words (K, d) float32 -> (d + 1, K): transposed, with a last row of |c|^2 / 2
    (computed in float32, as the scores' subtraction used it; see Tokenizer._nearest)."""
    out = np.empty((words.shape[1] + 1, words.shape[0]), dtype=np.float32)
    out[:-1] = words.T
    out[-1] = 0.5 * (words * words).sum(axis=1)
    return out


def view_signals(signals: list[np.ndarray], fs: float, view: dict) -> np.ndarray:
    """`view_signal` of several recordings of one shape, as one (n, recordings, leads)
    array: their leads side by side through one filter pass (each lead is filtered on
    its own, so the same numbers)."""
    if len(signals) == 1 or not view.get("resample_first"):
        return np.stack([view_signal(s, fs, view) for s in signals], axis=1)
    clean = view_signal(np.concatenate(signals, axis=1), fs, view)
    return clean.reshape(clean.shape[0], len(signals), signals[0].shape[1])


def shape_windows(wins: np.ndarray, view: dict) -> np.ndarray:
    """The view's last steps on cut windows: re-centre on R, then unit energy ("l2")."""
    m = int(view.get("align_samples") or 0)
    if m and wins.shape[0]:
        wins = align_windows(wins, m)
    norm = view.get("beat_norm")
    if norm == "zl2" and wins.shape[0]:
        # Centred first: then the Euclidean nearest word is the one with the highest
        # Pearson r, the measure fidelity reports.
        wins = wins - wins.mean(axis=2, keepdims=True, dtype=np.float64).astype(np.float32)
    if norm in ("l2", "zl2") and wins.shape[0]:
        # Energy and division in float64, then float32, with one float64 buffer for
        # both (the same numbers as `np.where(energy > 1e-6, wins / energy, 0)`).
        w64 = wins.astype(np.float64)
        np.multiply(w64, w64, out=w64)
        energy = np.sqrt(w64.sum(axis=2, keepdims=True))
        scaled = np.divide(wins, np.maximum(energy, 1e-6), out=w64).astype(np.float32)
        scaled[~(energy > 1e-6)[:, :, 0]] = 0.0
        wins = scaled
    return wins


def align_windows(wins: np.ndarray, m: int) -> np.ndarray:
    """Shift each (beat, lead) window so its largest |value| near the centre sits at R;
    samples shifted in from outside the window are 0.

    Each window is padded with m zeros on both sides and the shifted window taken as
    one of the 2m + 1 windows a sliding view offers: one gather of whole rows, instead
    of an index, a clip and a mask the size of all the windows.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    n = wins.shape[2]
    seg = np.abs(wins[:, :, W.R_INDEX - m : W.R_INDEX + m + 1])
    start = seg.argmax(axis=2)  # shift + m
    padded = np.zeros(wins.shape[:2] + (n + 2 * m,), dtype=np.float32)
    padded[:, :, m : m + n] = wins
    shifted = sliding_window_view(padded, n, axis=2)  # (beats, leads, 2m + 1, n)
    return np.take_along_axis(shifted, start[:, :, None, None], axis=2)[:, :, 0]


def pearson_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of (N, D) arrays (nan where a row is constant)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def tokenizer_meta(
    vocab_size: int, seed: int, n_beats: int, source: str, view: dict | None = None
) -> dict:
    """The settings a tokenizer was fitted under, as stored in tokenizer.json."""
    view = dict(DEFAULT_VIEW if view is None else view)
    return {
        **view,
        "format_version": FORMAT_VERSION,
        "kind": "heartbeat-kmeans",
        "codebook_size": vocab_size,
        "window_fs": W.WINDOW_FS,
        "window_len": W.WINDOW_LEN,
        "r_index": W.R_INDEX,
        "band_hz": list(W.BAND_HZ),
        "rr_edges_s": [round(float(x), 6) for x in RR_EDGES_S],
        "special_tokens": {"PAD": PAD, "SEP": SEP, "UNK": UNK, "CLS": CLS, "MASK": MASK},
        "rhythm_offset": N_SPECIAL,
        "n_rhythm": N_RHYTHM,
        "morph_offset": N_SPECIAL + N_RHYTHM,
        "seed": seed,
        "fitted_on_beats": int(n_beats),
        "fitted_on": source,
    }


def fit_codebook(beats: np.ndarray, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Mini-batch k-means on beat windows (N, D); seeded and deterministic."""
    from sklearn.cluster import MiniBatchKMeans

    beats = np.asarray(beats, dtype=np.float32)
    k = min(vocab_size, len(beats))
    km = MiniBatchKMeans(
        n_clusters=k,
        random_state=seed,
        batch_size=4096,
        n_init=3,
        max_iter=100,
        reassignment_ratio=0.01,
    )
    km.fit(beats)
    centers = km.cluster_centers_.astype(np.float32)
    # Order words by energy so ids are stable and small ids are quiet beats.
    return centers[np.argsort((centers**2).sum(axis=1), kind="stable")]


def fit_atrial_codebook(windows: np.ndarray, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Atrial words: k-means on atrial windows (N, ATRIAL_LEN), ordered by energy, so the
    smallest ids are the flattest atria. Windows that are all masked are left out."""
    x = np.asarray(windows, dtype=np.float32)
    x = x[np.abs(x).sum(axis=1) > 0]
    if x.shape[0] == 0:
        raise ValueError("no atrial window to fit atrial words on")
    return fit_codebook(x, vocab_size, seed)


def principal_basis(beats: np.ndarray, dims: int) -> np.ndarray:
    """The `dims` orthonormal rows (dims, D) that hold most of the windows' energy.

    Uncentred SVD of the sample; each row's sign is fixed (largest entry positive) so the
    same sample always gives the same basis.
    """
    x = np.asarray(beats, dtype=np.float64)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[:dims]
    flip = np.sign(basis[np.arange(basis.shape[0]), np.abs(basis).argmax(axis=1)])
    return (basis * flip[:, None]).astype(np.float32)


def fit_codebook_in_subspace(
    beats: np.ndarray, vocab_size: int, dims: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """(codebook (K, D), basis (dims, D) or None): k-means on the windows' coordinates in
    their `dims` principal directions, words mapped back to waveforms.

    Low-passed at 25 Hz and sampled at 100 Hz, a beat window has far fewer than 96
    degrees of freedom: 48 directions keep 99.9% of the energy. Words that lie in that
    subspace make the nearest-word search exact with half the arithmetic, which is what
    lets the vocabulary grow (see `Tokenizer.assign`). dims <= 0 or >= D: plain k-means.
    """
    beats = np.asarray(beats, dtype=np.float32)
    if dims <= 0 or dims >= beats.shape[1]:
        return fit_codebook(beats, vocab_size, seed), None
    basis = principal_basis(beats, dims)
    coords = fit_codebook(beats @ basis.T, vocab_size, seed)
    return (coords @ basis).astype(np.float32), basis


def build_sentence(
    words: np.ndarray, rhythm: np.ndarray, atrial: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lead-major sentence with lead (-1 for rhythm/special) and beat positions.

    With `atrial` words (leads, beats), each beat of a lead reads atrial word, then
    morphology word."""
    n_leads, n_beats = words.shape
    per_beat = 1
    if atrial is not None:
        words = np.stack([atrial, words], axis=2).reshape(n_leads, 2 * n_beats)
        per_beat = 2
    positions = np.repeat(np.arange(n_beats), per_beat)
    parts = [np.array([CLS]), rhythm, np.array([SEP])]
    lead = [np.array([-1]), np.full(n_beats, -1), np.array([-1])]
    beat = [np.array([-1]), np.arange(n_beats), np.array([-1])]
    for i in range(n_leads):
        parts += [words[i], np.array([SEP])]
        lead += [np.full(positions.size, i), np.array([i])]
        beat += [positions, np.array([-1])]
    return (
        np.concatenate(parts).astype(np.int32),
        np.concatenate(lead).astype(np.int16),
        np.concatenate(beat).astype(np.int32),
    )
