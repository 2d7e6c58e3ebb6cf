"""The quality benchmark's Table-1 view over result rows: ours beside the paper's, per method
(Zhang et al. 2016, Table 1; docs/protocols.md section 6).

One line per method we scored (its main rows; the temperature sweep is left out), matched to the
published method named in the rows' ``paper_method`` hparam; then the published methods we did not
score. Rendered by :func:`ssl_colorize.results.format_table` (full method names, one decimal, "-"
where there is no number).
"""

from __future__ import annotations

import json

import pandas as pd

from ssl_colorize.quality import BENCHMARK
from ssl_colorize.results import format_table

#: Table columns: (title, our metric, published metric); None where one side has no such number.
COLUMNS = (
    ("AuC raw", "auc_raw", None), ("AuC raw (paper)", None, "auc_raw"),
    ("AuC rebal", "auc_rebalanced", None), ("AuC rebal (paper)", None, "auc_rebalanced"),
    ("top-1", "top1", None), ("top-1 (paper)", None, "vgg16_top1"),
    ("colourful", "colourfulness", None), ("fooled (paper)", None, "amt_fooled"),
)
NOTE = ("paper: Zhang et al. 2016, Table 1 (10k ImageNet val images, VGG-16 top-1, AMT study); "
        "ours: the images scored here, so only the pattern is comparable")


def _published_by_method(published: pd.DataFrame | None) -> dict[str, dict[str, float]]:
    if published is None or not len(published):
        return {}
    out: dict[str, dict[str, float]] = {}
    for _, row in published[published["benchmark"] == BENCHMARK].iterrows():
        out.setdefault(str(row["method"]), {})[str(row["metric"])] = float(row["value"])
    return out


def quality_table(rows: list[dict], published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Methods x the Table-1 columns (a :func:`ssl_colorize.results.paper_table`-shaped frame)."""
    paper = _published_by_method(published)
    ours: dict[str, dict] = {}
    for row in rows:
        if row["protocol"].startswith("temperature_sweep"):
            continue
        hparams = row["hparams"] if isinstance(row["hparams"], dict) else json.loads(row["hparams"])
        label = hparams.get("label", row["encoder"])
        entry = ours.setdefault(label, {"paper_method": hparams.get("paper_method"), "protocol": row["protocol"]})
        if not row["protocol"].startswith("classifier_top1"):
            entry["protocol"] = row["protocol"]
        entry["top1" if row["metric"].endswith("_top1") else row["metric"]] = float(row["value"])
    records, shown = [], set()
    for label, values in ours.items():
        theirs = paper.get(values["paper_method"] or "", {})
        shown.add(values["paper_method"])
        record = {"method": label, "kind": "ours", "protocol": values["protocol"], "runs": pd.NA}
        for title, mine, published_metric in COLUMNS:
            record[title] = values.get(mine) if mine else theirs.get(published_metric)
        records.append(record)
    for method, theirs in paper.items():
        if method not in shown:
            record = {"method": method, "kind": "published", "protocol": "paper only", "runs": pd.NA}
            for title, _, published_metric in COLUMNS:
                record[title] = theirs.get(published_metric) if published_metric else None
            records.append(record)
    titles = [title for title, _, _ in COLUMNS]
    table = pd.DataFrame.from_records(records, columns=["method", "kind", "protocol", *titles, "runs"])
    table[titles] = table[titles].astype(float)
    return table


def format_quality_table(rows: list[dict], published: pd.DataFrame | None = None) -> str:
    """The Table-1 view as text, with a note on comparability when published numbers are shown."""
    text = format_table(quality_table(rows, published), title="colorization quality (paper Table 1)")
    return text + ("\n" + NOTE if _published_by_method(published) else "")
