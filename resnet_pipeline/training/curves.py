"""Training curves as a PNG, as seed 001 draws them: loss and accuracy per epoch, train and val."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels (loss, accuracy) of `history` rows (epoch, train_/val_ loss and accuracy)."""
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
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
