"""What a linear-probe run leaves behind: result rows, the printed tables, the accuracy-vs-layer plot
and the run's ``summary.json`` (docs/protocols.md section 4)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd

from ssl_colorize import results
from ssl_colorize.atomic import atomic_write
from ssl_colorize.engine.probe_settings import BENCHMARK, slug

#: The hyper-parameters every row carries in ``hparams`` (besides the tap's pooling and counts).
ROW_HPARAMS = ("epochs", "batch_size", "lr", "wd", "momentum", "nesterov", "lr_steps", "crop", "resize",
               "geometry", "input_mode", "encoder_args", "data", "max_train_batches", "limit")


def checkpoint_column(settings: dict) -> str:
    """What the 'checkpoint' column says: the checkpoint as given, 'random', or, for a random-initialised
    encoder loaded from a weights file (``--encoder-arg weights_path=...``), 'weights:<file>'."""
    weights = settings["encoder_args"].get("weights_path")
    if settings["checkpoint"] == "random" and weights:
        return f"weights:{weights}"
    return settings["checkpoint"]


def make_rows(settings: dict, probe, metrics: dict, run_id: str, total_iters: int, n_train: int, n_val: int,
              n_classes: int) -> list:
    """One row per (tap, metric); the hyper-parameters (and the tap's pooling) go into ``hparams``."""
    common = {key: settings[key] for key in ROW_HPARAMS}
    common.update(iterations=total_iters, n_train=n_train, n_val=n_val, num_classes=n_classes)
    rows = []
    for tap, info in probe.describe().items():
        for metric in ("top1", "top5"):
            rows.append(results.make_row(
                run_id=run_id, benchmark=BENCHMARK, checkpoint=checkpoint_column(settings), encoder=settings["encoder"],
                tap=tap, dataset=settings["dataset"], split="val", protocol=settings["protocol"], metric=metric,
                value=round(float(metrics[tap][metric]), 4), seed=settings["seed"],
                hparams={**common, **info, "n_eval": metrics[tap]["n"]},
            ))
    return rows


def append_once(out_csv: Path, rows: list, run_id: str) -> bool:
    """Append the rows unless the table already holds this run's (a rerun of a finished run)."""
    existing = results.read_rows(out_csv)
    if len(existing) and (existing["run_id"].astype(str) == str(run_id)).any():
        print(f"run {run_id} already has its rows in {out_csv}; not appending them again")
        return False
    results.append_rows(out_csv, rows)
    return True


def print_tables(out_csv: Path, dataset: str, taps: list[str]) -> pd.DataFrame:
    """Our rows on this dataset beside the published ones; each title says which layers this run probed."""
    table_rows = results.read_rows(out_csv)
    ran = ", ".join(taps)
    for title, table in results.paper_tables(table_rows, results.load_published(), benchmark=BENCHMARK,
                                             dataset=dataset, reference=False):
        print("\n" + results.format_table(table, f"{title}  (this run: {ran})"))
    return table_rows


def plot_path(out_csv: Path, dataset: str) -> Path:
    return out_csv.with_name(f"{out_csv.stem}_{slug(dataset)}_top1.png")


def plot_accuracy_vs_layer(table: pd.DataFrame, png_path: Path, title: str) -> Path:
    """Top-1 against layer for each method of a tap-columned ``results.paper_table``.

    Several layers: a line per method (ours solid, published dashed). A single layer: one labelled bar
    per method (a line through one point is a lone dot). The title wraps instead of being clipped.
    Uses a bare :class:`matplotlib.figure.Figure` (no pyplot state, no display).
    """
    from matplotlib.figure import Figure

    layers = [c for c in results.value_columns(table) if c != "best"]
    if not layers or not len(table):
        raise ValueError("plot_accuracy_vs_layer: the table has no layer columns")
    labels = [f"{row['method']} [{row['protocol']}]" for _, row in table.iterrows()]
    if len(layers) == 1:
        layer = layers[0]
        values = [float(v) for v in pd.to_numeric(table[layer], errors="coerce").fillna(0.0)]
        fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(values)))
        ax = fig.add_subplot()
        bars = ax.barh(range(len(values)), values, color=["C0" if k == "ours" else "0.7" for k in table["kind"]])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=8)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"top-1 accuracy (%) at {layer}")
        ax.set_xlim(0, max(100.0, max(values) * 1.1))
    else:
        fig = Figure(figsize=(1.2 * len(layers) + 4.5, 4.2))
        ax = fig.add_subplot()
        x = list(range(len(layers)))
        for label, (_, row) in zip(labels, table.iterrows()):
            y = [float(row[c]) if not pd.isna(row[c]) else float("nan") for c in layers]
            ours = row["kind"] == "ours"
            ax.plot(x, y, marker="o" if ours else ".", linestyle="-" if ours else "--", linewidth=2 if ours else 1,
                    alpha=1.0 if ours else 0.7, label=label)
        ax.set_xticks(x, layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, alpha=0.3)
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    png_path = Path(png_path)
    with atomic_write(png_path, "wb") as handle:  # concurrent runs never leave a torn PNG
        fig.savefig(handle, dpi=110, format="png", bbox_inches="tight")
    return png_path


def plot_dataset(table_rows: pd.DataFrame, out_csv: Path, dataset: str, protocol: str) -> Path:
    """Every run of ours on this dataset with this protocol (and the published rows of the same protocol,
    when the dataset has some): curves measured different ways never share a plot."""
    table = results.paper_table(table_rows, results.load_published(), benchmark=BENCHMARK, dataset=dataset,
                                metric="top1", protocol=protocol)
    layers = [c for c in results.value_columns(table) if c != "best"]
    what = f"top-1 at {layers[0]}" if len(layers) == 1 else "top-1 against layer"
    return plot_accuracy_vs_layer(table, plot_path(out_csv, dataset), f"linear probes on {dataset}: {what}")


def write_summary(path: Path, *, run_id: str, settings: dict, metrics: dict, skipped: list[str], out_csv: Path,
                  png: Path | None, elapsed: float) -> Path:
    """summary.json: the final numbers, every unreadable file by name, where the rows and plot went."""
    summary = {
        "run_id": run_id, "benchmark": BENCHMARK, "encoder": settings["encoder"],
        "checkpoint": checkpoint_column(settings), "dataset": settings["dataset"], "taps": settings["taps"],
        "metrics": metrics, "skipped_files": len(skipped), "skipped": skipped,
        "rows": str(out_csv), "plot": str(png) if png else None, "elapsed_s": round(elapsed, 1),
    }
    with atomic_write(path, "w") as handle:
        json.dump(summary, handle, indent=2, default=str)
        handle.write("\n")
    return path
