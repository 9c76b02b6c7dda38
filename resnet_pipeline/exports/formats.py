"""The export formats, their file names, and the settings of an export and of its check (no TensorFlow)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_pipeline.config import EXPORT_FORMATS

if TYPE_CHECKING:
    from resnet_pipeline.config import Config


@dataclass(frozen=True)
class Format:
    name: str
    file: str  # its name in a model folder and in a registry version
    runtime: str  # the Python package that runs it
    int8: bool  # full-integer quantized: checked by top-1 agreement with Keras, not by |Δ|


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", "model.onnx", "onnxruntime", int8=False),
    "litert": Format("litert", "model.tflite", "ai_edge_litert", int8=False),
    "litert-int8": Format("litert-int8", "model.int8.tflite", "ai_edge_litert", int8=True),
}
assert tuple(FORMATS) == EXPORT_FORMATS, "config.EXPORT_FORMATS names the formats of this table"


class ExportError(ValueError):
    """An export that cannot be made, or that disagrees with the Keras model beyond its bound."""


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ExportError(f"format: received {name!r}; allowed: {', '.join(map(repr, FORMATS))}")
    return FORMATS[name]


def sidecar(path: str | Path) -> Path:
    """The JSON written beside an exported file: `model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


@dataclass(frozen=True)
class ExportSettings:
    """What an export reads and the bounds its check holds it to (params `register.export_*`)."""

    calibration_images: int = 200  # litert-int8: a seeded sample of the train split sets the int8 ranges
    check_images: int = 256  # a seeded sample of the test split (all of it if smaller) run through both models
    max_diff: float = 1e-4  # float formats: the largest |Δ| of a probability allowed, against Keras
    min_agreement: float = 0.9  # litert-int8: the smallest share of check images with Keras' top-1 allowed
    seed: int = 42  # of both samples (params: base.seed)

    @classmethod
    def from_config(cls, cfg: Config) -> ExportSettings:
        r = cfg.register
        return cls(
            calibration_images=r.export_calibration_images,
            check_images=r.export_check_images,
            max_diff=r.export_max_diff,
            min_agreement=r.export_min_agreement,
            seed=cfg.base.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
