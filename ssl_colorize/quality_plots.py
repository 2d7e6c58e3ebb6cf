"""Figures of the colorization-quality benchmark (docs/protocols.md section 6), drawn on
``matplotlib.figure.Figure`` objects (no pyplot, no global backend: safe in any process).

- :func:`save_examples`: one row per image; columns grey input, each model, ground truth;
- :func:`save_sweep_plot`: AuC (raw, rebalanced) and colourfulness against the annealed-mean
  temperature, one line per checkpoint, the grey and ground-truth baselines as references.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ssl_colorize.atomic import atomic_write


def _save(fig: Figure, path: Path) -> Path:
    """PNG written atomically (a kill leaves the previous figure or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path


def save_examples(examples: list, labels: list[str], path: Path) -> Path:
    """A grid of :class:`ssl_colorize.quality.Example`: grey input, each model (by label), ground truth."""
    columns = ["grey input"] + labels + ["ground truth"]
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(examples)))
    axes = fig.subplots(len(examples), len(columns), squeeze=False)
    for row, example in enumerate(examples):
        images = [example.grey] + [example.ours[label] for label in labels] + [example.truth]
        for col, image in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_sweep_plot(sweep: dict, baselines: dict, temperature: float, path: Path) -> Path:
    """``sweep``: label -> {T: metrics}; ``baselines``: "grey" / "ground_truth" -> metrics."""
    fig = Figure(figsize=(11, 4))
    ax_auc, ax_col = fig.subplots(1, 2)
    for label, points in sweep.items():
        ts = sorted(points)
        line = ax_auc.plot(ts, [points[t]["auc_raw"] for t in ts], "o-", label=f"{label}: raw")[0]
        ax_auc.plot(ts, [points[t]["auc_rebalanced"] for t in ts], "s--", color=line.get_color(),
                    label=f"{label}: rebalanced")
        ax_col.plot(ts, [points[t]["colourfulness"] for t in ts], "o-", color=line.get_color(), label=label)
    if "grey" in baselines:
        ax_auc.axhline(baselines["grey"]["auc_raw"], color="grey", ls=":", lw=1, label="grey: raw")
        ax_auc.axhline(baselines["grey"]["auc_rebalanced"], color="black", ls=":", lw=1, label="grey: rebalanced")
        ax_col.axhline(baselines["grey"]["colourfulness"], color="grey", ls=":", lw=1, label="grey")
    if "ground_truth" in baselines:
        ax_col.axhline(baselines["ground_truth"]["colourfulness"], color="black", ls="-.", lw=1, label="ground truth")
    for ax, ylabel in ((ax_auc, "AuC (%)"), (ax_col, "colourfulness (Hasler-Suesstrunk)")):
        ax.set_xscale("log")
        ax.axvline(temperature, color="red", lw=0.8, alpha=0.6)
        ax.set_xlabel("annealed-mean temperature T (log scale; red: the main rows' T)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Temperature sweep: T -> 0 is the mode (vivid), T = 1 the mean (desaturated)")
    fig.tight_layout()
    return _save(fig, path)
