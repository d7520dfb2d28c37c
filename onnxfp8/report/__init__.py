"""Reports for people: PNG plots (plots.py, needs matplotlib: the ``plots`` extra) and the self-contained HTML
sweep report (html.py, plots inlined as base64 PNG). Text and JSON reports never need these."""
