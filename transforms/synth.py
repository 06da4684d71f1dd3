"""Synthetic multi-lead ECG with known beat positions, and the demo's own WFDB archive.

The repo carries no third-party recordings and a fresh machine may have no internet, so
the demo builds its archive here. Only NumPy, SciPy and wfdb are used.

How a signal is made (after McSharry et al.'s ECGSYN, in a cardiac-dipole form):

* Each beat is a sum of Gaussian waves in time (P, septal Q, R, S, T; T is asymmetric).
  Every wave carries a 3-D cardiac dipole vector (x: to the patient's left, y: inferior,
  z: anterior), so the heart's activity is one vector signal ``d(t)``.
* Electrode potentials are projections of ``d(t)`` onto electrode positions (RA, LA, LL on
  an Einthoven triangle centred on the heart, V1-V6 around the chest), plus per-electrode
  noise: baseline wander, mains hum and white noise.
* The 12 leads are the standard differences of electrode potentials (I = LA - RA,
  II = LL - RA, ..., Vi against Wilson's central terminal), so III = II - I,
  aVR = -(I + II) / 2 and the rest hold as they do on a real machine.
* Samples are rounded to 1 uV, so a WFDB file with gain 1000/mV stores them exactly.

The true R peak of a beat is the sample where the emitted signal of the reference lead
(lead II when present, else the lead where the QRS projects most strongly) reaches the
maximum of that beat's main QRS deflection: the index is exact for the returned signal.
"""

from __future__ import annotations

import csv
import os

import numpy as np

RHYTHMS = ("sinus", "af", "pvc", "flat")
STANDARD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
# Monitoring / Holter names that stand for a standard lead's direction.
_ALIASES = {
    "MLI": "I",
    "MLII": "II",
    "MLIII": "III",
    "D1": "I",
    "D2": "II",
    "D3": "III",
    "CM5": "V5",
    "CC5": "V5",
    "ML5": "V5",
}
SNOMED = {
    "af": "164889003",  # atrial fibrillation
    "sinus": "426783006",  # sinus rhythm
    "pvc": "427172004",  # premature ventricular contractions
}

# Electrodes: RA, LA, LL on an Einthoven triangle centred on the origin (so Wilson's
# central terminal carries no cardiac signal), lead I has unit length; V1..V6 on the
# chest in the horizontal plane, angle measured from the left (+x) towards anterior (+z),
# with precordial gains (closer to the heart, larger than the limb leads).
_S3 = np.sqrt(3.0)
_LIMB_POS = np.array(
    [[-0.5, -0.5 / _S3, 0.0], [0.5, -0.5 / _S3, 0.0], [0.0, 1.0 / _S3, 0.0]]
)  # RA, LA, LL
_V_ANGLE_DEG = np.array([118.0, 96.0, 72.0, 50.0, 28.0, 4.0])
_V_GAIN = np.array([1.0, 1.5, 1.6, 1.5, 1.25, 1.0])
_V_POS = _V_GAIN[:, None] * np.stack(
    [
        np.cos(np.radians(_V_ANGLE_DEG)),
        np.full(6, 0.08),
        np.sin(np.radians(_V_ANGLE_DEG)),
    ],
    axis=1,
)
ELECTRODE_POS = np.vstack([_LIMB_POS, _V_POS])  # (9, 3): RA, LA, LL, V1..V6


def _lead_matrix() -> np.ndarray:
    """(12, 9) map from electrode potentials to the 12 standard leads."""
    m = np.zeros((12, 9))
    ra, la, ll = 0, 1, 2
    m[0, [la, ra]] = [1, -1]  # I
    m[1, [ll, ra]] = [1, -1]  # II
    m[2, [ll, la]] = [1, -1]  # III
    m[3, [ra, la, ll]] = [1, -0.5, -0.5]  # aVR
    m[4, [la, ra, ll]] = [1, -0.5, -0.5]  # aVL
    m[5, [ll, ra, la]] = [1, -0.5, -0.5]  # aVF
    for i in range(6):  # Vi - WCT
        m[6 + i, 3 + i] = 1.0
        m[6 + i, [ra, la, ll]] = -1.0 / 3.0
    return m


LEAD_MATRIX = _lead_matrix()

# Wave templates of a normal conducted beat: (name, centre s, sigma-left s, sigma-right s,
# dipole vector in mV). Times are relative to the main R deflection.
_NORMAL_WAVES = [
    ("P", -0.165, 0.022, 0.022, (0.075, 0.12, 0.02)),
    ("Q", -0.02, 0.01, 0.01, (-0.12, 0.03, 0.30)),
    ("R", 0.0, 0.0105, 0.0105, (0.72, 0.88, 0.34)),
    ("S", 0.026, 0.011, 0.011, (-0.10, -0.13, -0.62)),
    ("T", 0.30, 0.065, 0.042, (0.20, 0.26, 0.22)),
]
# A right-ventricular-outflow-tract PVC: wide, inferior axis (tall in II, III, aVF), LBBB-like
# (negative in V1), with a discordant T wave.
_PVC_WAVES = [
    ("R", 0.0, 0.027, 0.031, (0.10, 1.55, -0.75)),
    ("T", 0.31, 0.070, 0.050, (-0.05, -0.35, 0.20)),
]


def _canonical_lead(name: str) -> str:
    key = name.strip()
    for lead in STANDARD_LEADS:
        if key.upper() == lead.upper():
            return lead
    if key.upper() in _ALIASES:
        return _ALIASES[key.upper()]
    raise ValueError(f"unknown lead name {name!r}: use a standard lead or one of {_ALIASES}")


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A small random rotation: per-patient variation of the heart's electrical axis."""
    out = np.eye(3)
    for axis in range(3):
        a = np.radians(rng.uniform(-max_deg, max_deg))
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def _rr_sinus(rng: np.random.Generator, mean_rr: float, n: int) -> np.ndarray:
    """Regular RR with respiratory sinus arrhythmia, a slow (Mayer) wave and small jitter."""
    k = np.arange(n)
    t = k * mean_rr
    f_resp = rng.uniform(0.2, 0.3)
    rr = mean_rr * (
        1.0
        + rng.uniform(0.02, 0.04) * np.sin(2 * np.pi * f_resp * t + rng.uniform(0, 2 * np.pi))
        + 0.015 * np.sin(2 * np.pi * 0.1 * t + rng.uniform(0, 2 * np.pi))
        + 0.008 * rng.standard_normal(n)
    )
    return rr


def _rr_af(rng: np.random.Generator, mean_rr: float, n: int) -> np.ndarray:
    """Irregularly irregular RR: independent draws, coefficient of variation about 0.25."""
    sigma = 0.25
    rr = mean_rr * rng.lognormal(-0.5 * sigma**2, sigma, n)
    return np.clip(rr, 0.33, 2.5)  # AV-node refractoriness bounds the shortest RR


def _smooth_noise(rng: np.random.Generator, n: int, fs: float, cutoff_hz: float) -> np.ndarray:
    """Unit-variance Gaussian noise low-passed below `cutoff_hz` (cheap: knot interpolation)."""
    step = max(1, int(fs / (2 * cutoff_hz)))
    knots = rng.standard_normal(n // step + 3)
    x = np.arange(n) / step
    from scipy.interpolate import CubicSpline

    return CubicSpline(np.arange(knots.size), knots)(x)


def _add_wave(
    d: np.ndarray, t0: float, fs: float, sl: float, sr: float, vec: np.ndarray, amp: float
) -> None:
    n = d.shape[0]
    lo = max(0, int(np.floor((t0 - 5 * sl) * fs)))
    hi = min(n, int(np.ceil((t0 + 5 * sr) * fs)) + 1)
    if hi <= lo:
        return
    t = np.arange(lo, hi) / fs - t0
    sig = np.where(t < 0, sl, sr)
    d[lo:hi] += (amp * np.exp(-0.5 * (t / sig) ** 2))[:, None] * vec[None, :]


def synthesize_ecg(
    duration_s: float,
    fs: float,
    lead_names: list[str] | None = None,
    rhythm: str = "sinus",
    heart_rate: float = 70.0,
    noise_mv: float = 0.02,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesize an ECG.

    Returns ``(signal, r_peaks)``: ``signal`` is float32 (n_samples, n_leads) in mV, rounded
    to 1 uV; ``r_peaks`` (int64) are the exact sample indices of each beat's main QRS
    maximum in the reference lead (lead II when present). ``noise_mv`` scales all noise
    (white noise of about that standard deviation per lead, baseline wander about five times
    it, mains hum half of it); 0 gives a clean signal. ``rhythm`` is one of "sinus", "af",
    "pvc" (sinus with occasional premature ventricular beats) or "flat" (lead off: a
    constant zero line, no beats). The same arguments always give the same output.
    """
    if rhythm not in RHYTHMS:
        raise ValueError(f"rhythm must be one of {RHYTHMS}, got {rhythm!r}")
    if duration_s <= 0 or fs <= 0 or heart_rate <= 0:
        raise ValueError("duration_s, fs and heart_rate must be positive")
    names = list(lead_names) if lead_names is not None else list(STANDARD_LEADS)
    if not names:
        raise ValueError("lead_names must not be empty")
    rows = [STANDARD_LEADS.index(_canonical_lead(nm)) for nm in names]
    proj = LEAD_MATRIX[rows]  # (L, 9) electrodes -> requested leads
    lead_vec = proj @ ELECTRODE_POS  # (L, 3) dipole -> requested leads

    n = int(round(duration_s * fs))
    if rhythm == "flat":
        return np.zeros((n, len(names)), np.float32), np.zeros(0, np.int64)

    rng = np.random.default_rng([seed, RHYTHMS.index(rhythm), int(round(fs)), len(names)])
    dur = n / fs
    mean_rr = 60.0 / heart_rate
    n_beats = int(dur / 0.28) + 8

    # Per-patient morphology: axis rotation, amplitude, P-R interval, QRS width, T size.
    rot = _rotation(rng, 12.0)
    gain = rng.uniform(0.8, 1.2)
    pr = rng.uniform(0.145, 0.19)
    qrs_w = rng.uniform(0.9, 1.12)
    t_gain = rng.uniform(0.8, 1.25)
    waves = []
    for name, c, sl, sr, v in _NORMAL_WAVES:
        v = rot @ np.asarray(v) * gain * (t_gain if name == "T" else 1.0)
        if name in ("Q", "R", "S"):
            c, sl, sr = c * qrs_w, sl * qrs_w, sr * qrs_w
        if name == "P":
            c = -pr
        waves.append((name, c, sl, sr, v))
    pvc_waves = [(nm, c, sl, sr, rot @ np.asarray(v) * gain) for nm, c, sl, sr, v in _PVC_WAVES]

    # Beat times: a random phase, then RR intervals; PVCs come early with a full
    # compensatory pause.
    rr = (_rr_af if rhythm == "af" else _rr_sinus)(rng, mean_rr, n_beats)
    times = -rng.uniform(0.3, 1.0) * mean_rr - mean_rr + np.concatenate([[0.0], np.cumsum(rr)])
    is_pvc = np.zeros(times.size, bool)
    if rhythm == "pvc":
        k = 2
        while k < times.size - 1:
            if rng.random() < 0.08:
                gap = times[k] - times[k - 1]
                times[k] = times[k - 1] + rng.uniform(0.55, 0.7) * gap
                is_pvc[k] = True
                k += 2
            else:
                k += 1
    edge = 0.1  # no QRS centre within 100 ms of either end: a partial QRS has no true maximum
    first = np.searchsorted(times, 0.0)
    if first < times.size and times[first] < edge:
        times = times + (edge - times[first])
    keep = times < dur - edge
    times, is_pvc = times[keep], is_pvc[keep]
    prev_rr = np.diff(np.concatenate([[times[0] - mean_rr], times]))

    # Cardiac dipole d(t), beat by beat.
    d = np.zeros((n, 3))
    resp_f, resp_ph = rng.uniform(0.2, 0.3), rng.uniform(0, 2 * np.pi)
    for tb, rr_b, pvc in zip(times, prev_rr, is_pvc, strict=True):
        amp = 1.0 + 0.05 * np.sin(2 * np.pi * resp_f * tb + resp_ph)  # respiratory modulation
        qt = np.sqrt(np.clip(rr_b, 0.3, 2.0))  # Bazett-like: repolarisation scales with sqrt(RR)
        for name, c, sl, sr, v in pvc_waves if pvc else waves:
            if name == "P" and rhythm == "af":
                continue
            if name == "T":
                c, sl, sr = c * qt, sl * qt, sr * qt
            _add_wave(d, tb + c, fs, sl, sr, v, amp)

    if rhythm == "af":  # fibrillatory waves: 4-9 Hz, frequency- and amplitude-modulated
        t = np.arange(n) / fs
        f0 = rng.uniform(5.0, 7.5)
        inst_f = f0 + 0.6 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t + rng.uniform(0, 6))
        inst_f = np.clip(inst_f, 4.0, 9.0)
        phase = 2 * np.pi * np.cumsum(inst_f) / fs + rng.uniform(0, 2 * np.pi)
        env = rng.uniform(0.05, 0.09) * (1.0 + 0.35 * _smooth_noise(rng, n, fs, 0.5).clip(-2, 2))
        f_vec = rot @ np.array([0.25, 0.55, 0.80])
        d += (env * np.sin(phase))[:, None] * f_vec[None, :]

    # Electrode potentials = projection of the dipole + per-electrode noise.
    elec = d @ ELECTRODE_POS.T  # (n, 9)
    if noise_mv > 0:
        t = np.arange(n) / fs
        ne = elec.shape[1]
        wander = (
            5.0
            * noise_mv
            * (
                0.6 * np.sin(2 * np.pi * resp_f * t[:, None] + rng.uniform(0, 2 * np.pi, ne))
                + 0.5 * _smooth_noise(rng, n * ne, fs, 0.4).reshape(ne, n).T
            )
        )
        wander *= rng.uniform(0.3, 1.0, ne)
        elec += wander
        mains = 50.0 if rng.random() < 0.5 else 60.0
        if fs > 2.2 * mains:
            elec += (
                0.5 * noise_mv * rng.uniform(0.3, 1.0, ne) * np.sin(2 * np.pi * mains * t[:, None])
            )
        elec += (noise_mv / np.sqrt(2.0)) * rng.standard_normal((n, ne))
    signal_uv = np.round((elec @ proj.T) * 1000.0)  # integer microvolts, (n, L)

    # True R peaks: the extremum of each beat's main QRS deflection in the reference lead
    # (lead II when present, else the lead where the QRS is largest), found on the
    # emitted signal around where the noise-free QRS template has it.
    grid = np.arange(-0.08, 0.08, 0.0005)

    def qrs_template(ws) -> np.ndarray:  # (grid, L) noise-free QRS in each lead
        out = np.zeros((grid.size, len(rows)))
        for name, c, sl, sr, v in ws:
            if name in ("Q", "R", "S"):
                sig_w = np.where(grid < c, sl, sr)
                out += np.exp(-0.5 * ((grid - c) / sig_w) ** 2)[:, None] * (lead_vec @ v)[None]
        return out

    q_normal, q_pvc = qrs_template(waves), qrs_template(pvc_waves)
    ref = rows.index(1) if 1 in rows else int(np.argmax(np.abs(q_normal).max(axis=0)))
    inside = times >= edge - 1e-9
    r_peaks = np.empty(int(inside.sum()), np.int64)
    for i, (tb, pvc) in enumerate(zip(times[inside], is_pvc[inside], strict=True)):
        q = (q_pvc if pvc else q_normal)[:, ref]
        k = int(np.argmax(np.abs(q)))
        sign = 1.0 if q[k] >= 0 else -1.0
        centre = (tb + grid[k]) * fs
        half = (0.03 if pvc else 0.02) * fs
        lo = max(0, int(np.floor(centre - half)))
        hi = min(n, int(np.ceil(centre + half)) + 1)
        r_peaks[i] = lo + int(np.argmax(sign * signal_uv[lo:hi, ref]))
    return (signal_uv / 1000.0).astype(np.float32), r_peaks


# ---------------------------------------------------------------------------------------
# Demo archive

# (folder, name, rhythm, fs, seconds, leads, heart rate, age, sex)
_DEMO_SPECS = [
    ("patient01", "ecg_0001", "sinus", 500, 10.0, STANDARD_LEADS, 68, 54, "Male"),
    ("patient01", "ecg_0002", "af", 500, 10.0, STANDARD_LEADS, 96, 54, "Male"),
    ("patient02", "holter_0003", "sinus", 360, 360.0, ["MLII", "V5"], 74, 67, "Female"),
    ("patient03", "ecg_0004", "af", 300, 30.0, ["I"], 104, 71, "Male"),
    ("patient04", "ecg_0005", "flat", 500, 10.0, STANDARD_LEADS, 70, 45, "Female"),
    ("patient05", "ecg_0006", "pvc", 500, 10.0, STANDARD_LEADS, 72, 62, "Male"),
    ("patient05", "ecg_0007", "sinus", 500, 10.0, STANDARD_LEADS, 58, 62, "Male"),
    ("patient06", "ecg_0008", "af", 500, 10.0, STANDARD_LEADS, 82, 78, "Female"),
    ("patient06", "ecg_0009", "af", 500, 10.0, STANDARD_LEADS, 118, 78, "Female"),
    ("patient07", "ecg_0010", "sinus", 500, 10.0, STANDARD_LEADS, 88, 33, "Female"),
    ("patient08", "ecg_0011", "sinus", 300, 30.0, ["I"], 64, 41, "Male"),
    ("patient08", "ecg_0012", "af", 500, 10.0, STANDARD_LEADS, 90, 41, "Male"),
]


def _demo_spec(i: int) -> tuple:
    if i < len(_DEMO_SPECS):
        return _DEMO_SPECS[i]
    rhythm = ("sinus", "af")[i % 2]
    hr = 60 + (i * 7) % 50
    return (f"patient{9 + i // 2:02d}", f"ecg_{i + 1:04d}", rhythm, 500, 10.0, STANDARD_LEADS,
            hr, 30 + (i * 11) % 55, ("Male", "Female")[i % 2])  # fmt: skip


def write_demo_archive(out_dir: str, n_records: int = 12, seed: int = 0) -> list[str]:
    """Write a small synthetic WFDB archive under `out_dir`; return its header paths.

    Layout: ``out_dir/patientNN/<name>.hea|.dat`` (format 16, 1000 adu/mV, so the
    samples are exact to 1 uV), Challenge-style ``#Age``/``#Sex``/``#Dx`` header comments,
    plus ``out_dir/truth.csv`` (record_id, rhythm, r_peaks space-separated) and
    ``out_dir/manifest.csv`` (path relative to out_dir with ``.hea``, patient_id, rhythm).
    The first records cover 12-lead 500 Hz sinus and AF, a 2-lead 360 Hz 6-minute
    record, a 1-lead 300 Hz AF record and a flat line.
    """
    import wfdb

    os.makedirs(out_dir, exist_ok=True)
    paths, truth, manifest = [], [], []
    for i in range(n_records):
        folder, name, rhythm, fs, secs, leads, hr, age, sex = _demo_spec(i)
        signal, peaks = synthesize_ecg(
            secs, fs, list(leads), rhythm=rhythm, heart_rate=hr, seed=seed * 1000 + i
        )
        write_dir = os.path.join(out_dir, folder)
        os.makedirs(write_dir, exist_ok=True)
        n_sig = signal.shape[1]
        digital = np.round(signal.astype(np.float64) * 1000.0).astype(np.int16)
        dx = ",".join(
            {"sinus": [SNOMED["sinus"]], "af": [SNOMED["af"]], "flat": []}.get(
                rhythm, [SNOMED["sinus"], SNOMED["pvc"]]
            )
        )
        wfdb.wrsamp(
            name,
            fs=fs,
            units=["mV"] * n_sig,
            sig_name=list(leads),
            d_signal=digital,
            fmt=["16"] * n_sig,
            adc_gain=[1000.0] * n_sig,
            baseline=[0] * n_sig,
            comments=[f"Age: {age}", f"Sex: {sex}", f"Dx: {dx}", f"Rhythm: {rhythm} (synthetic)"],
            write_dir=write_dir,
        )
        rel = f"{folder}/{name}"
        paths.append(os.path.join(write_dir, name + ".hea"))
        truth.append((rel, rhythm, " ".join(str(int(p)) for p in peaks)))
        manifest.append((rel + ".hea", folder, rhythm))
    with open(os.path.join(out_dir, "truth.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["record_id", "rhythm", "r_peaks"])
        w.writerows(truth)
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "rhythm"])
        w.writerows(manifest)
    return paths
