"""Figures the scripts write into the run folder (PNG, written atomically, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.io import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig) -> None:
    """Write ``fig`` to ``path`` as PNG atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **{"dpi": 80, **savefig})
    pyplot().close(fig)


def history_plot(history, path: Path) -> None:
    """Train loss and validation score per epoch (one fold's history.csv)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = pyplot().subplots(1, 2, figsize=(9, 3.2))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.86, wspace=0.25)  # fixed: redrawn every epoch
    ax[0].plot(history["epoch"], history["train_loss"], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss")
    ax[1].plot(history["epoch"], history["val_score"], marker="o", color="C1")
    ax[1].set(xlabel="epoch", ylabel="val score")
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(str(path.parent))
    save_figure(fig, path)


def head_bars(names: list[str], single, blended, single_name: str, path: Path) -> None:
    """Per-head score of the best single model against the ensemble."""
    y = np.arange(len(names))
    fig, ax = pyplot().subplots(figsize=(8, 0.22 * len(names) + 1.2))
    ax.barh(y - 0.2, single, height=0.4, label=f"best single ({single_name})")
    ax.barh(y + 0.2, blended, height=0.4, label="ensemble (nested CV)")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("head score (harmonic mean of micro- and macro-F1)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
