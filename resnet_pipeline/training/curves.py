"""Training curves as a PNG, as seed 001 draws them: loss and accuracy per epoch, train and val.

The loss panel has a log axis: one early spike (a val loss of 43 at epoch 2 is common in the first epochs
of a ResNet) would otherwise flatten every other epoch into the bottom of the panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_curves(history: list[dict], title: str = "") -> Any:
    """A matplotlib Figure with two panels (loss on a log axis, accuracy) of `history` rows (epoch, train_/val_
    loss and accuracy); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = [float("nan") if h[f"{split}_{metric}"] is None else h[f"{split}_{metric}"] for h in history]
            ax.plot(epochs, values, style, label=f"{split} {metric}")  # nan: an epoch not validated
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (log scale)" if metric == "loss" else metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both" if metric == "loss" else "major")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Draw `history` (see draw_curves) into the PNG `path`."""
    import matplotlib.pyplot as plt

    fig = draw_curves(history, title)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
