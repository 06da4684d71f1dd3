"""The morning report of `ecgtok nightly`: one self-contained HTML page per night.

It shows the counts, the distribution of the records' maximum p(AF) as an inline SVG
histogram (drawn here, no plotting dependency), the patients above the alert threshold,
what changed since the previous night, and the records that failed. Every value taken
from the data is HTML-escaped.
"""

from __future__ import annotations

import html

_MAX_LISTED = 200


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def histogram_svg(values: list[float], threshold: float, bins: int = 20) -> str:
    """An SVG histogram of values in [0, 1] with the threshold drawn as a dashed line."""
    width, height, left, bottom, top, right = 560, 240, 48, 36, 12, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    peak = max(counts) if counts and max(counts) > 0 else 1
    bar_w = plot_w / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Histogram of the maximum p(AF) per record">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    for i, c in enumerate(counts):
        if not c:
            continue
        h = plot_h * c / peak
        x = left + i * bar_w
        above = (i + 1) / bins > threshold
        colour = "#c0392b" if above else "#2c7fb8"
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{i / bins:.2f}-{(i + 1) / bins:.2f}: '
            f"{c} records</title></rect>"
        )
    y0 = top + plot_h
    parts.append(
        f'<line x1="{left}" y1="{y0}" x2="{left + plot_w}" y2="{y0}" stroke="black"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="black"/>'
    )
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * plot_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" stroke="black"/>'
            f'<text x="{x:.1f}" y="{y0 + 16}" font-size="11" text-anchor="middle">{t:g}</text>'
        )
    for frac in (0.0, 0.5, 1.0):
        y = y0 - frac * plot_h
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{round(frac * peak)}</text>"
        )
    tx = left + threshold * plot_w
    parts.append(
        f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{y0}" stroke="#c0392b" '
        f'stroke-dasharray="5,4" stroke-width="2"/>'
        f'<text x="{tx + 4:.1f}" y="{top + 12}" font-size="11" fill="#c0392b">'
        f"alert threshold {threshold:g}</text>"
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="12" '
        'text-anchor="middle">maximum p(AF) over a record\'s segments</text>'
        f'<text x="12" y="{top + plot_h / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">records</text>',
    )
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    more = ""
    if len(rows) > _MAX_LISTED:
        body = "".join(
            "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[:_MAX_LISTED]
        )
        more = f"<p>… and {len(rows) - _MAX_LISTED} more (see the scores Parquet).</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _ids(ids: list[str]) -> str:
    if not ids:
        return "<em>none</em>"
    shown = ", ".join(_e(i) for i in ids[:_MAX_LISTED])
    return shown + (f" … and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def render(summary: dict, records: list[dict], alerts: list[dict], errors: list[dict]) -> str:
    """The report page. `records` are the night's score rows (one per cohort record)."""
    thr = summary["alert_threshold"]
    scored = [r["p_af_max"] for r in records if r.get("p_af_max") is not None]
    counts = [
        ("cohort records", summary["cohort_records"]),
        ("tokenized tonight", summary["tokenized"]),
        ("reused tokens", summary["reused"]),
        ("failed", summary["failed"]),
        ("scored", summary["scored"]),
        ("patients above threshold", summary["alerted_patients"]),
    ]
    ch = summary.get("changes", {})
    prev = ch.get("previous_date")
    alert_rows = [
        [
            a["patient_id"],
            a["records_above"],
            _fmt(a["p_af_max"]),
            _fmt(a["af_burden_max"]),
            ", ".join(a["record_ids"]),
        ]
        for a in alerts
    ]
    change_rows = [
        ("new records", ch.get("added", [])),
        ("records whose content changed", ch.get("modified", [])),
        ("records no longer in the cohort", ch.get("removed", [])),
        ("newly above threshold", ch.get("newly_alerted", [])),
        ("no longer above threshold", ch.get("no_longer_alerted", [])),
        ("newly failing", ch.get("newly_failed", [])),
        ("recovered (failed the previous night)", ch.get("recovered", [])),
    ]
    changes_html = (
        f"<p>Compared with the night of <strong>{_e(prev)}</strong>.</p>"
        if prev
        else "<p>No earlier night in this store: everything is new.</p>"
    )
    if summary.get("tokenizer_changed"):
        changes_html += (
            "<p><strong>The tokenizer changed: every record was re-tokenized.</strong></p>"
        )
    changes_html += (
        "<ul>"
        + "".join(f"<li>{_e(label)} ({len(ids)}): {_ids(ids)}</li>" for label, ids in change_rows)
        + "</ul>"
    )
    error_rows = [
        [e["record_id"], e.get("patient_id", ""), e["stage"], e["error_type"], e["message"][:300]]
        for e in errors
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ecgtok nightly {_e(summary["date"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.counts td:last-child {{ text-align: right; font-variant-numeric: tabular-nums; }}
.small {{ color: #666; font-size: .9em; }}
</style></head>
<body>
<h1>ecgtok nightly cohort scoring — {_e(summary["date"])}</h1>
<p class="small">model {_e(summary["model_id"])} · tokenizer {_e(summary["tokenizer_id"])} ·
alert threshold {thr:g} ({_e(summary["alert_threshold_source"])}) · run {_e(summary["run_id"])}</p>
<h2>Counts</h2>
<table class="counts"><tbody>
{"".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in counts)}
</tbody></table>
<h2>Score distribution</h2>
{histogram_svg(scored, thr)}
<p class="small">{len(scored)} scored records; bars at or above the threshold in red.</p>
<h2>Patients above the alert threshold</h2>
<p class="small">A patient is listed when any of their records has maximum p(AF) ≥ {thr:g}.
AF burden is the fraction of recorded time in segments at or above the threshold.</p>
{_table(["patient_id", "records above", "max p(AF)", "max AF burden", "records"], alert_rows)}
<h2>What changed since the previous night</h2>
{changes_html}
<h2>Failed records</h2>
{_table(["record_id", "patient_id", "stage", "error", "message"], error_rows)}
<p class="small">Research and data-engineering output; not a medical device.</p>
</body></html>
"""
