"""The self-contained HTML sweep report: tables and plots (inlined as base64 PNG) in one file.

Plots need matplotlib (the ``plots`` extra); without it the page holds the tables and says what is missing."""
from __future__ import annotations

import base64
import html
import math
from typing import List

from onnxfp8.errors import ConfigError

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.met td{background:#eef8ee}tr.tuned td{font-weight:bold}
pre{background:#f6f6f6;padding:1em;font-size:12px;overflow-x:auto}img{max-width:100%;margin:.5em 0}"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def render(report) -> str:
    """The sweep report (tuning/sweep.SweepReport) as one HTML page."""
    from onnxfp8.formats import get_format  # noqa: F401  (formats exist for the histogram panels)

    e = html.escape
    parts: List[str] = [f"<!doctype html><html><head><meta charset='utf-8'><title>onnxfp8 sweep: {e(report.source)}"
                        f"</title><style>{CSS}</style></head><body>",
                        f"<h1>onnxfp8 sweep: {e(report.source)}</h1>",
                        f"<p>{report.samples} validation sample(s); FP32 size {report.fp32_size / 1e6:.2f} MB; "
                        f"criterion {e(report.criterion.describe())}; {report.seconds:.1f} s.</p>"]
    head = ["configuration", "SQNR dB", "cosine", "top-1 agree", "accuracy", "acc. loss", "size", "fallback", "meets"]
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for row, cells in zip(report.rows, report.table_rows()):
        cls = " ".join(c for c, on in (("met", row.met), ("tuned", row.tuned)) if on)
        if row.error:
            cells = cells[:1] + [""] * 7 + [cells[-1]]
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    try:
        from onnxfp8.report import plots

        plots.require()
        have_plots = True
    except ConfigError as err:
        have_plots = False
        parts.append(f"<p><em>{e(str(err))}</em></p>")
    ok = [r.to_dict() for r in report.rows if not r.error]
    if have_plots and ok:
        parts.append("<h2>output SQNR per configuration</h2>" + _img(plots.sweep_png(ok, "sqnr_db"), "sweep"))
    if report.tuning is not None:
        parts.append("<h2>tuning: the search path</h2><pre>" + e(report.tuning.summary()) + "</pre>")
    sens = report.sensitivity
    if sens is not None:
        parts.append("<h2>per-layer sensitivity</h2>")
        if have_plots and sens.layers:
            parts.append(_img(plots.sensitivity_png(sens), "per-layer SQNR"))
        parts.append("<pre>" + e(sens.summary(limit=len(sens.layers))) + "</pre>")
    if report.histograms:
        parts.append("<h2>activation histograms on each format's grid</h2><p>The calibration histograms of |x| "
                     "of the inputs of the most sensitive layers; ticks: the values each format represents with "
                     "max scaling (scale = amax / format max).</p>")
        fmts = sens.formats if sens is not None else ["e4m3", "e3m4", "e5m2", "int8"]
        for t, h in report.histograms.items():
            parts.append(f"<h3>{e(t)} (read by {e(h['layer'])})</h3>")
            if have_plots:
                parts.append(_img(plots.histogram_png(t, h["hist"], fmts, h["amax"]), t))
    parts.append("</body></html>")
    return "\n".join(parts)
