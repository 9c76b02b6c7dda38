"""What a training run leaves: its step rows and epoch history (beside the checkpoints, so a
resumed run carries them on) and the model folder the train stage writes.

    artifacts/model/  model.keras, saved_model/, params.yaml, labels.json, train.json, init.json,
                      history.csv (per epoch), steps.csv (per summary), curves.png
"""

from __future__ import annotations

import csv
from pathlib import Path

from resnet_pipeline.config import MODEL_PARAMS, Config
from resnet_pipeline.data.pipeline import Preprocess
from resnet_pipeline.fileio import atomic_write_json, staged_dir
from resnet_pipeline.models.resnet import recursion_limit

HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_sec")
STEP_FIELDS = ("step", "loss", "accuracy", "lr")


def read_steps(path: Path) -> list[dict]:
    """The rows of a steps.csv (none if it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {"step": int(r["step"]), "loss": float(r["loss"]), "accuracy": float(r["accuracy"]), "lr": float(r["lr"])}
            for r in csv.DictReader(f)
        ]


def write_steps(path: Path, rows: list[dict]) -> None:
    """steps.csv, written beside and renamed into place."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_model_dir(
    model,
    full_config: Config,
    history,
    summary,
    classes,
    model_dir: Path,
    step_rows=(),
    init=None,
    *,
    saved_model: bool = True,
) -> None:
    """model.keras, the SavedModel (unless `saved_model` is false), the resolved config, history.csv,
    steps.csv, curves.png, train.json and init.json (the starting weights and fine-tuning), swapped in
    as a whole."""
    with staged_dir(model_dir) as tmp:
        atomic_write_json(tmp / "init.json", init or {"init": None})
        with recursion_limit():  # ResNet-1202's graph is deeper than Python's default limit
            model.save(tmp / "model.keras")
        if saved_model:
            from resnet_pipeline.export import export_saved_model  # the SavedModel for serving

            export_saved_model(
                model,
                classes,
                Preprocess.from_train(full_config.train),
                tmp / "saved_model",
                top_k=full_config.evaluate.top_k,
            )
        (tmp / MODEL_PARAMS).write_text(full_config.to_yaml())
        atomic_write_json(tmp / "labels.json", {"classes": classes})
        atomic_write_json(tmp / "train.json", summary)
        with open(tmp / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        write_steps(tmp / "steps.csv", list(step_rows))
        from resnet_pipeline.training.curves import plot_curves

        plot_curves(history, tmp / "curves.png", title=f"{model.name} ({summary['strategy']})")
