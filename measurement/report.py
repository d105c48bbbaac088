"""The scorecard as one self-contained HTML page: inline CSS, plots as PNG data URIs
(matplotlib, Agg backend), no script and no external resource of any kind, as the
service's own pages load no third-party code."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from measurement.scorecard import Figure, Scorecard

__all__ = ["render_html"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1b1b;max-width:1100px}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}
.warn{background:#fff4d6;border-left:4px solid #d99a00;padding:.5rem 1rem}
.note{color:#555;font-size:.85rem}
img{max-width:100%;border:1px solid #ddd}
"""


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}g}"
    return html.escape(str(value))


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def _weekly_plot(weekly: pd.DataFrame) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = weekly.dropna(subset=["lift"])
    if not len(rows):
        return None
    figure, axis = plt.subplots(figsize=(9, 3.4))
    weeks = pd.to_datetime(rows["week_start"])
    lift = rows["lift"].to_numpy(float)
    low = rows["low"].to_numpy(float)
    high = rows["high"].to_numpy(float)
    axis.errorbar(
        weeks,
        lift,
        yerr=[np.nan_to_num(lift - low), np.nan_to_num(high - lift)],
        fmt="o-",
        capsize=3,
        color="#1f5fa8",
    )
    axis.axhline(0, color="#888", linewidth=0.8)
    axis.set_ylabel("attach-rate lift")
    axis.set_title("Lift per weekly cycle (exposed - control), 95% interval")
    figure.autofmt_xdate()
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def _group_plot(table: pd.DataFrame, column: str, most: int = 12) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = table.sort_values("n_exposed", ascending=False).head(most)
    if not len(rows):
        return None
    figure, axis = plt.subplots(figsize=(9, 3.2))
    position = np.arange(len(rows))
    axis.bar(position - 0.2, rows["attach_exposed"].fillna(0), 0.4, label="exposed")
    axis.bar(position + 0.2, rows["attach_control"].fillna(0), 0.4, label="control")
    axis.set_xticks(position, [str(v)[:18] for v in rows[column]], rotation=30, ha="right")
    axis.set_ylabel("attach rate")
    axis.set_title(f"Attach rate by {column}")
    axis.legend()
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def _figures_table(figures: list[Figure]) -> str:
    head = (
        "<tr><th>measure</th><th>exposed</th><th>control</th><th>lift</th>"
        "<th>95% interval</th><th>n exposed</th><th>n control</th><th>note</th></tr>"
    )
    rows = []
    for f in figures:
        interval = f"[{_number(f.low)}, {_number(f.high)}]" if f.low is not None else "—"
        extra = ""
        if "variance_reduction" in f.extra:
            extra = (
                f"θ={_number(f.extra['theta'])}, variance reduction "
                f"{_number(f.extra['variance_reduction'])}, raw lift "
                f"{_number(f.extra['raw_lift'])} "
                f"[{_number(f.extra['raw_low'])}, {_number(f.extra['raw_high'])}]. "
            )
        rows.append(
            f"<tr><td title='{html.escape(f.description)}'>{html.escape(f.name)}</td>"
            f"<td>{_number(f.exposed)}</td><td>{_number(f.control)}</td>"
            f"<td>{_number(f.lift)}</td><td>{interval}</td><td>{_number(f.n_exposed)}</td>"
            f"<td>{_number(f.n_control)}</td>"
            f"<td class='note'>{extra}{html.escape(f.reason or '')}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _frame_table(table: pd.DataFrame, most: int = 40) -> str:
    shown = table.head(most)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    more = (
        f"<p class='note'>{len(table) - most} more rows in the JSON.</p>"
        if len(table) > most
        else ""
    )
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _image(source: str | None, alt: str) -> str:
    if source is None:
        return f"<p class='note'>{html.escape(alt)}: no data to plot.</p>"
    return f"<img alt='{html.escape(alt)}' src='{source}'>"


def render_html(scorecard: Scorecard) -> str:
    """The report: notes (what the data can and cannot show), the headline figures, the
    CUPED revenue lifts, the weekly lift plot, attach rate by segment and channel, and the
    per-group and offer-cycle tables."""
    from measurement.scorecard import OBSERVATIONAL_DESIGN

    start, end = scorecard.period
    period = f"{start:%Y-%m-%d} to {end:%Y-%m-%d}" if start is not None else "no data"
    warn = " class='warn'" if scorecard.design == OBSERVATIONAL_DESIGN else ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in scorecard.notes)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>nextbest scorecard</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>nextbest scorecard</h1>",
        f"<p>Design: <b>{html.escape(scorecard.design)}</b>. Period {period}. Attribution "
        f"window {scorecard.window_days:g} days. Intervals: 95% cluster bootstrap over "
        f"customers ({scorecard.resamples} resamples, seed {scorecard.seed}).</p>",
        f"<div{warn}><ul>{notes}</ul></div>",
        "<h2>Per opportunity</h2>",
        _figures_table(scorecard.figures),
        "<h2>Revenue per customer (CUPED) and cohort value</h2>",
        _figures_table(scorecard.revenue),
        "<h2>Lift per week</h2>",
        _image(_weekly_plot(scorecard.weekly), "lift per week"),
    ]
    for name in ("segment", "channel"):
        if name in scorecard.by:
            parts += [
                f"<h2>Attach rate by {name}</h2>",
                _image(_group_plot(scorecard.by[name], name), f"attach rate by {name}"),
            ]
    if scorecard.fairness is not None:
        report = scorecard.fairness
        verdict = (
            f"{len(report.breaches)} parity breach(es)" if report.breaches else "no parity breach"
        )
        parts += [
            "<h2>Fairness: parity per group</h2>",
            f"<p>{html.escape(verdict)} (a ratio to the best group under "
            f"{report.min_parity:g}, judged on groups of at least {report.min_group_size} "
            "customers).</p>",
            *(
                [_frame_table(pd.DataFrame([asdict(b) for b in report.breaches]))]
                if report.breaches
                else []
            ),
            _frame_table(report.table()),
        ]
    for name, table in scorecard.by.items():
        parts += [f"<h2>By {html.escape(name)}</h2>", _frame_table(table)]
    parts += ["<h2>Offer cycles</h2>", _frame_table(scorecard.cycles), "</body></html>"]
    return "\n".join(parts)
