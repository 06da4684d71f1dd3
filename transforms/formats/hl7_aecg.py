"""HL7 aECG, the FDA annotated ECG (root `AnnotatedECG`, namespace urn:hl7-org:v3).

The recording is the top-level `component/series` coded RHYTHM (derived median beats
sit under `series/derivation` and are skipped). Each of its `sequenceSet`s has one time
sequence (`GLIST_TS` absolute or `GLIST_PQ` relative: a head and an increment) and one
`SLIST_PQ` sequence per lead: value = origin + scale x digits. Lead codes are
`MDC_ECG_LEAD_*`. Several sequence sets (leads acquired in turn) are laid on one time
axis from their heads; leads come out in the standard 12-lead order.
"""

from __future__ import annotations

import warnings

import numpy as np

from ecgtok.transforms.formats._common import (
    MAX_VALUES,
    child,
    fail,
    make_record,
    parse_root,
)
from ecgtok.transforms.formats.deid import (
    DeidPolicy,
    Demographics,
    normalise_sex,
    parse_date,
    parse_hl7_ts,
)
from ecgtok.transforms.leads import STANDARD_LEADS, normalise_lead_name
from ecgtok.transforms.wfdb_reader import Record

FORMAT = "hl7_aecg"
ROOT = "AnnotatedECG"
_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6, "10*-3.v": 1.0, "10*-6.v": 1e-3}
_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_LEAD_PREFIX = "MDC_ECG_LEAD_"


def _num(elem, attr: str, what: str) -> float:
    try:
        v = float(elem.get(attr))
    except (TypeError, ValueError):
        raise fail("bad_header", f"HL7 aECG: {what} is missing or not a number") from None
    if not np.isfinite(v):
        raise fail("bad_header", f"HL7 aECG: {what} is not finite")
    return v


def _unit(elem, table: dict, what: str, default: str) -> float:
    unit = (elem.get("unit") or default).strip().lower()
    if unit not in table:
        raise fail("unsupported", f"HL7 aECG: {what} unit is not supported")
    return table[unit]


def _digits(value, lead_no: int) -> np.ndarray:
    digits = value.find("digits")
    if digits is None or not (digits.text or "").strip():
        raise fail("no_signal", f"HL7 aECG: lead {lead_no} has no digits")
    body = digits.text
    n_tokens = len(body.split())
    if n_tokens > MAX_VALUES:
        raise fail("too_large", "HL7 aECG: a lead holds too many samples")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older NumPy stops early on bad text: counted below
            values = np.fromstring(body, dtype=np.float64, sep=" ")
    except ValueError:
        values = np.zeros(0)
    if len(values) != n_tokens:
        raise fail("bad_signal", f"HL7 aECG: lead {lead_no} digits are not numbers")
    return values


def _lead_name(code: str) -> str:
    c = code.strip()
    if c.upper().startswith(_LEAD_PREFIX):
        c = c[len(_LEAD_PREFIX) :]
    return c


def _sequence_set(
    sset, set_no: int
) -> tuple[float | None, float, dict[str, np.ndarray], dict[str, str]]:
    """(head in s, increment in s, lead -> mV samples, lead -> original code)."""
    head = None
    increment = None
    leads: dict[str, np.ndarray] = {}
    originals: dict[str, str] = {}
    for seq in sset.iter("sequence"):
        code_el = seq.find("code")
        value = seq.find("value")
        if code_el is None or value is None:
            continue
        code = code_el.get("code") or ""
        vtype = (value.get("type") or "").upper()
        if code.upper().startswith("TIME_") or vtype in ("GLIST_TS", "GLIST_PQ"):
            inc = value.find("increment")
            if inc is None:
                raise fail("bad_header", "HL7 aECG: time sequence has no increment")
            increment = _num(inc, "value", "time increment") * _unit(
                inc, _TO_S, "time increment", "s"
            )
            h = value.find("head")
            if h is not None and vtype == "GLIST_TS":
                ts = parse_hl7_ts(h.get("value"))
                head = ts.timestamp() if ts is not None else None
            elif h is not None and h.get("value") is not None:
                head = _num(h, "value", "time head") * _unit(h, _TO_S, "time head", "s")
            continue
        if vtype != "SLIST_PQ":
            continue
        lead_no = len(leads) + 1
        origin_el, scale_el = value.find("origin"), value.find("scale")
        origin = 0.0 if origin_el is None else _num(origin_el, "value", "origin")
        origin_mv = 0.0 if origin_el is None else _unit(origin_el, _TO_MV, "origin", "uV")
        if scale_el is None:
            raise fail("bad_header", f"HL7 aECG: lead {lead_no} has no scale")
        scale = _num(scale_el, "value", "scale") * _unit(scale_el, _TO_MV, "scale", "uV")
        name = normalise_lead_name(_lead_name(code))
        samples = _digits(value, lead_no) * scale + origin * origin_mv
        if name in leads:
            raise fail("bad_header", f"HL7 aECG: a lead appears twice in sequence set {set_no}")
        leads[name] = samples
        originals[name] = _lead_name(code)
    if increment is None:
        raise fail("bad_header", f"HL7 aECG: sequence set {set_no} has no time sequence")
    if increment <= 0:
        raise fail("bad_sampling_rate", "HL7 aECG: time increment is not positive")
    return head, increment, leads, originals


def _demographics(root) -> Demographics:
    person = None
    subject = None
    for e in root.iter("trialSubject"):
        subject = e
        person = e.find("subjectDemographicPerson")
        break
    demo = Demographics()
    if subject is not None:
        sid = subject.find("id")
        if sid is not None:
            demo.patient_id = sid.get("extension") or sid.get("root")
    if person is not None:
        g = person.find("administrativeGenderCode")
        demo.sex = normalise_sex(g.get("code")) if g is not None else None
        b = person.find("birthTime")
        if b is not None:
            demo.birth_date = parse_date((b.get("value") or "")[:8])
    eff = root.find("effectiveTime")
    if eff is not None:
        for tag in ("center", "low"):
            e = eff.find(tag)
            if e is not None and e.get("value"):
                demo.acquired = parse_hl7_ts(e.get("value"))
                break
    for obs in root.iter("relatedObservation"):
        c = obs.find("code")
        v = obs.find("value")
        if c is not None and c.get("code") == "21612-7" and v is not None:  # LOINC reported age
            try:
                age = float(v.get("value"))
            except (TypeError, ValueError):
                continue
            unit = (v.get("unit") or "a").lower()
            demo.age = {"a": age, "mo": age / 12, "wk": age / 52, "d": age / 365}.get(unit)
    model = None
    for e in root.iter("manufacturerModelName"):
        if (e.text or "").strip():
            model = e.text.strip()
            break
    demo.device = model
    return demo


def read_aecg(data: bytes, path: str, record_id: str, policy: DeidPolicy) -> Record:
    root = parse_root(data, "HL7 aECG", ROOT, "HL7 AnnotatedECG")
    series = None
    for comp in root.findall("component"):
        s = comp.find("series")
        if s is None:
            continue
        code = child(s, "code")
        if series is None or (code is not None and (code.get("code") or "").upper() == "RHYTHM"):
            series = s
            if code is not None and (code.get("code") or "").upper() == "RHYTHM":
                break
    if series is None:
        raise fail("no_signal", "HL7 aECG: no waveform series")
    sets = [c.find("sequenceSet") for c in series.findall("component")]
    sets = [s for s in sets if s is not None]
    if not sets:
        raise fail("no_signal", "HL7 aECG: the rhythm series holds no sequence set")
    parsed = [_sequence_set(s, i + 1) for i, s in enumerate(sets)]
    parsed = [p for p in parsed if p[2]]
    if not parsed:
        raise fail("no_signal", "HL7 aECG: the rhythm series holds no lead data")
    increment = parsed[0][1]
    if any(abs(p[1] - increment) > 1e-9 * max(1.0, increment) for p in parsed):
        raise fail("unsupported", "HL7 aECG: sequence sets with different sampling rates")
    heads = [p[0] for p in parsed]
    base = min(h for h in heads if h is not None) if any(h is not None for h in heads) else 0.0
    starts = [0 if h is None else int(round((h - base) / increment)) for h in heads]
    if len(parsed) == 1:
        starts = [0]
    for p in parsed:
        lengths = {len(v) for v in p[2].values()}
        if len(lengths) != 1:
            raise fail("bad_signal", "HL7 aECG: leads of one sequence set differ in length")
    lengths = [len(next(iter(p[2].values()))) for p in parsed]
    total = max(s + n for s, n in zip(starts, lengths))
    if total > 2 * sum(lengths):
        raise fail("bad_header", "HL7 aECG: sequence sets lie far apart in time (corrupt heads)")
    names: list[str] = []
    originals: dict[str, str] = {}
    for p in parsed:
        for k in p[2]:
            if k not in originals:
                names.append(k)
                originals[k] = p[3][k]
    if total * len(names) > MAX_VALUES:
        raise fail("too_large", "HL7 aECG: the recording is too large")
    order = [k for k in STANDARD_LEADS if k in originals] + [
        k for k in names if k not in STANDARD_LEADS
    ]
    col = {k: i for i, k in enumerate(order)}
    signal = np.zeros((total, len(order)), dtype=np.float64)
    for s, p in zip(starts, parsed):
        for k, v in p[2].items():
            signal[s : s + len(v), col[k]] = v
    demo = _demographics(root)
    meta = policy.meta(demo, FORMAT)
    return make_record(
        record_id,
        path,
        round(1.0 / increment, 6),
        signal,
        [originals[k] for k in order],
        meta,
        policy,
        "HL7 aECG",
    )
