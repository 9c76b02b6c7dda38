"""The training curves PNG: the loss panel on a log axis, so an early spike does not flatten the rest."""

from __future__ import annotations

from resnet_pipeline.training.curves import draw_curves, plot_curves

# the default run's shape: val loss 43 at epoch 2, then around 0.05
HISTORY = [
    {"epoch": e, "train_loss": t, "val_loss": v, "train_accuracy": a, "val_accuracy": b}
    for e, (t, v, a, b) in enumerate(
        [(2.1, 2.4, 0.3, 0.2), (0.9, 43.0, 0.7, 0.1), (0.3, 0.2, 0.9, 0.93), (0.1, 0.06, 0.97, 0.98)]
    )
]


def test_loss_panel_is_log_scaled_and_shows_every_epoch():
    import matplotlib.pyplot as plt

    fig = draw_curves(HISTORY, "ResNet-20")
    try:
        loss, accuracy = fig.axes
        assert (loss.get_yscale(), accuracy.get_yscale()) == ("log", "linear")
        low, high = loss.get_ylim()
        assert low <= 0.06 and high >= 43.0  # the spike and the last epoch both in view
        assert [line.get_label() for line in loss.get_lines()] == ["train loss", "val loss"]
        assert list(loss.get_lines()[1].get_xdata()) == [1, 2, 3, 4]
    finally:
        plt.close(fig)


def test_plot_curves_writes_a_png(tmp_path):
    path = plot_curves(HISTORY, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
