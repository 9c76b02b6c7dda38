"""Portable exports of a trained model beside its SavedModel: ONNX and LiteRT, float and full-integer
int8, each run beside the Keras model it came from and refused unless it agrees (README, "Export
formats"), with a JSON beside it that holds what a caller needs to feed it.

    resnet-pipeline export --format onnx|litert|litert-int8 [--model DIR|NAME@ALIAS|NAME:VERSION] OUT

- `formats`: the formats, their file names and the caller's description (no TensorFlow);
- `convert`: Keras model -> the bytes of a format (TensorFlow, tf2onnx, the LiteRT converter);
- `runtime`: runs an exported file with ONNX Runtime or `ai_edge_litert` (NumPy only);
- `sample`: the seeded samples of a split the int8 calibration and the checks read;
- `make`: convert, check, write (`export_model`), and the register stage's exports.

This package imports no TensorFlow; `convert`, `sample` and `make` do.
"""

from __future__ import annotations

from resnet_pipeline.exports.formats import FORMATS, ExportError, ExportSettings, Format, sidecar

__all__ = ["FORMATS", "ExportError", "ExportSettings", "Format", "sidecar"]
