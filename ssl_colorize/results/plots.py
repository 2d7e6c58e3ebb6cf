"""Figures of the paper tables, drawn on a :class:`matplotlib.figure.Figure` of their own (no pyplot,
no global backend switch: safe in a library, in threads and beside a user's own plots)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ssl_colorize.atomic import atomic_write
from ssl_colorize.results.tables import row_label, value_columns


def plot_accuracy_vs_layer(table: pd.DataFrame, png_path: str | os.PathLike, title: str = "") -> Path:
    """Draw each method of a tap-columned :func:`~ssl_colorize.results.paper_table` as accuracy against
    layer; ours solid, published dashed. Writes a PNG (no display needed)."""
    layers = [c for c in value_columns(table) if c != "best"]
    if not layers:
        raise ValueError("plot_accuracy_vs_layer: the table has no layer columns")
    fig = Figure(figsize=(1.2 * len(layers) + 4.5, 4.2))
    ax = fig.add_subplot()
    x = list(range(len(layers)))
    for _, row in table.iterrows():
        y = [float(row[c]) if not pd.isna(row[c]) else float("nan") for c in layers]
        ours = row["kind"] == "ours"
        ax.plot(x, y, marker="o" if ours else ".", linestyle="-" if ours else "--", linewidth=2 if ours else 1,
                alpha=1.0 if ours else 0.7, label=row_label(row["method"], row["protocol"]))
    ax.set_xticks(x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write(png_path, "wb") as handle:  # concurrent runs never leave a torn PNG
        fig.savefig(handle, dpi=110, format="png")
    return png_path
