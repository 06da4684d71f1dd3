"""What of a hospital export's patient data may leave the reader (issue 11).

Exports carry names, MRNs, birth dates, acquisition dates, staff names, sites and
free-text comments. The readers in this package collect what they find into a
`Demographics` and hand it to `DeidPolicy.meta`, which alone decides what reaches
`Record.meta`:

* always allowed: age in whole years (ages of 90 and over become 90, as HIPAA's safe
  harbour asks), sex ('M'/'F'), the acquisition device's make and model, the export
  format and schema version;
* `patient_key`: an HMAC-SHA256 of the MRN with the key the user supplies
  (`--pseudonym-key`), or no patient key at all without one;
* `acquired` (acquisition date-time, ISO 8601): dropped, unless a key is supplied, in
  which case it is shifted by a per-patient keyed offset of -365..+365 days (intervals
  between one patient's ECGs are kept, dates are not);
* `dx` (free-text interpretation statements, which do hold names: "Confirmed by Doe,
  John"): dropped;
* names, MRNs, birth dates, sites, staff, comments: never in `meta`.

`carry_identifiers=True` (an explicit option for sites allowed the raw values) carries
the raw MRN as `patient_id`, the raw acquisition time, the free-text statements and
keeps the file path as it is.

File names can hold identifiers too, so a hospital export's `record_id` is
`export_record_id(path)`: a keyed hash of the path (an unkeyed SHA-256 of it without a
key; pass a key to make it unguessable), and `public_path` replaces the path wherever a
path would be written. Error messages from the readers never quote the path or a value
read from the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
from dataclasses import dataclass, field

KEY_ENV = "ECGTOK_PSEUDONYM_KEY"
CARRY_ENV = "ECGTOK_CARRY_IDENTIFIERS"
MAX_AGE = 90  # HIPAA safe harbour: ages over 89 are aggregated
DATE_SHIFT_DAYS = 365


@dataclass
class Demographics:
    """Everything a reader found about the patient and the acquisition (raw, private)."""

    patient_id: str | None = None  # MRN / subject id
    age: float | None = None  # years
    birth_date: _dt.date | None = None
    sex: str | None = None  # 'M', 'F' or None
    acquired: _dt.datetime | None = None
    device: str | None = None  # make/model of the cart, never a serial number
    statements: list[str] = field(default_factory=list)  # free-text interpretation

    def __repr__(self) -> str:  # never print identifiers by accident
        return "Demographics(<private>)"


def _sex(value: object) -> str | None:
    v = str(value or "").strip().lower()
    if v in ("m", "male", "1"):
        return "M"
    if v in ("f", "female", "2"):
        return "F"
    return None


def normalise_sex(value: object) -> str | None:
    """'M', 'F' or None from the many spellings exports use (MALE, m, 1, ...)."""
    return _sex(value)


def age_from_dates(birth: _dt.date | None, at: _dt.date | None) -> float | None:
    """Whole years between birth and the acquisition (None if either is unknown)."""
    if birth is None or at is None:
        return None
    years = at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))
    return float(years) if 0 <= years < 150 else None


@dataclass(frozen=True)
class DeidPolicy:
    """The site's choice: a pseudonym key (bytes) and whether raw identifiers may pass."""

    key: bytes | None = None
    carry_identifiers: bool = False

    def __repr__(self) -> str:
        return f"DeidPolicy(key={'<set>' if self.key else None}, carry_identifiers={self.carry_identifiers})"

    @classmethod
    def from_env(cls) -> DeidPolicy:
        """Key from $ECGTOK_PSEUDONYM_KEY, carrying from $ECGTOK_CARRY_IDENTIFIERS=1."""
        key = os.environ.get(KEY_ENV)
        carry = os.environ.get(CARRY_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(key=key.encode() if key else None, carry_identifiers=carry)

    @classmethod
    def from_settings(cls, key_file: str | None, carry_identifiers: bool) -> DeidPolicy:
        """Key read from `key_file` (local or gs://); else from the environment.

        Jobs pass the key *file* through the graph, never the key, so the secret does not
        end up in a runner's job description.
        """
        env = cls.from_env()
        key = env.key
        if key_file:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(key_file, mime_type="application/octet-stream") as f:
                key = f.read().strip() or None
        return cls(key=key, carry_identifiers=carry_identifiers or env.carry_identifiers)

    def _mac(self, domain: str, value: str) -> str:
        assert self.key is not None
        return hmac.new(self.key, f"{domain}\0{value}".encode(), hashlib.sha256).hexdigest()

    def patient_key(self, patient_id: str | None) -> str | None:
        """HMAC of the MRN with the user's key; None without a key or an MRN."""
        pid = (patient_id or "").strip()
        if not pid or not self.key:
            return None
        return self._mac("patient", pid)[:32]

    def date_offset_days(self, patient_id: str | None) -> int | None:
        """Per-patient keyed shift in [-365, 365] days; None when dates must be dropped."""
        pid = (patient_id or "").strip()
        if not pid or not self.key:
            return None
        n = int(self._mac("date-shift", pid)[:8], 16)
        return n % (2 * DATE_SHIFT_DAYS + 1) - DATE_SHIFT_DAYS

    def meta(self, demo: Demographics, fmt: str, **extra: object) -> dict:
        """The non-identifying `Record.meta` for one export (plus whatever is allowed)."""
        age = demo.age
        if age is None and demo.birth_date is not None and demo.acquired is not None:
            age = age_from_dates(demo.birth_date, demo.acquired.date())
        if age is not None and not (0 <= age < 150):
            age = None
        if age is not None:
            age = float(min(int(age), MAX_AGE))
        meta: dict = {
            "age": age,
            "sex": demo.sex if demo.sex in ("M", "F") else None,
            "dx": [],
            "format": fmt,
            "device": _clean_device(demo.device),
            "patient_key": self.patient_key(demo.patient_id),
            "acquired": None,
        }
        if self.carry_identifiers:
            meta["patient_id"] = demo.patient_id
            meta["acquired"] = demo.acquired.isoformat() if demo.acquired else None
            meta["dx"] = [s for s in demo.statements if s]
            if demo.age is not None:
                meta["age"] = float(demo.age)
        elif demo.acquired is not None:
            offset = self.date_offset_days(demo.patient_id)
            if offset is not None:
                meta["acquired"] = (demo.acquired + _dt.timedelta(days=offset)).isoformat()
        meta.update(extra)
        return meta

    def record_id(self, path: str, plain_id: str | None = None) -> str:
        return export_record_id(path, self, plain_id)

    def public_path(self, path: str, record_id: str) -> str:
        return public_path(path, record_id, self)


def _clean_device(device: str | None) -> str | None:
    if not device:
        return None
    d = " ".join(str(device).split())[:64]
    return d or None


def export_record_id(
    path: str, policy: DeidPolicy | None = None, plain_id: str | None = None
) -> str:
    """The record id of a hospital export: a keyed hash of `path`.

    Pass as `path` what identifies the file stably, e.g. its path relative to the archive
    root (the id discovery would otherwise use), so local and gs:// copies of an archive
    get the same ids. With `carry_identifiers` the plain id is kept: `plain_id` if given,
    else the file name without folder and suffix. Without a key the hash is a plain
    SHA-256 (stable across runs, but guessable from a known path): sites should set a key.
    """
    policy = policy or DeidPolicy()
    if policy.carry_identifiers:
        if plain_id:
            return plain_id
        base = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base
    if policy.key:
        digest = policy._mac("record", path)
    else:
        digest = hashlib.sha256(f"record\0{path}".encode()).hexdigest()
    return "x" + digest[:24]


def public_path(path: str, record_id: str, policy: DeidPolicy | None = None) -> str:
    """What may be written where a source path would go: the path, or a placeholder."""
    policy = policy or DeidPolicy()
    if policy.carry_identifiers:
        return path
    return f"export:{record_id}"


def parse_date(text: str | None) -> _dt.date | None:
    """A date from the spellings exports use: YYYYMMDD, YYYY-MM-DD, MM-DD-YYYY, MM/DD/YYYY."""
    t = (text or "").strip()
    if not t:
        return None
    for fmt in ("%Y%m%d", "%Y-%m-%d", "%m-%d-%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y/%m/%d"):
        try:
            return _dt.datetime.strptime(t[: len(_dt.date(2000, 1, 1).strftime(fmt))], fmt).date()
        except ValueError:
            continue
    return None


def parse_hl7_ts(text: str | None) -> _dt.datetime | None:
    """An HL7 TS value (YYYYMMDD[HHMM[SS[.fff]]][+ZZZZ]) as a naive datetime."""
    t = (text or "").strip()
    for sep in ("+", "-"):
        if sep in t[8:]:
            t = t[: 8 + t[8:].index(sep)]
    digits, _, frac = t.partition(".")
    if len(digits) < 8 or not digits.isdigit():
        return None
    try:
        dt = _dt.datetime(
            int(digits[0:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10] or 0),
            int(digits[10:12] or 0),
            int(digits[12:14] or 0),
        )
    except ValueError:
        return None
    if frac.isdigit():
        dt += _dt.timedelta(microseconds=int((frac + "000000")[:6]))
    return dt
