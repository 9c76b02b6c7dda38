"""Run an exported model: ONNX Runtime for `onnx`, `ai_edge_litert` (LiteRT's interpreter) for `litert` and
`litert-int8`. NumPy in, NumPy out: no TensorFlow.

    runner = Runner("litert-int8", "model.int8.tflite")
    logits = runner.logits(images)  # float32 [N, H, W, 3], preprocessed as the export's JSON says

An int8 model's input is quantized here (`q = round(x / scale) + zero_point`, clipped to int8) and its
output dequantized (`(q - zero_point) * scale`), with the scale and zero point stored in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from resnet_pipeline.exports.formats import ExportError, get_format

BATCH = 32  # images per call: at 224 px, ResNet-50's activations of 32 images take ~2 GB in each runtime


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class Runner:
    """An exported model, loaded once. `input` and `output` describe its tensors: `name`, `shape` (None
    for a free dimension), `dtype` and, for int8, `quantization` (`scale`, `zero_point`)."""

    def __init__(self, fmt: str, model: bytes | str | Path, *, threads: int | None = None):
        self.format = get_format(fmt)
        self.threads = threads or os.cpu_count() or 1
        source = model if isinstance(model, bytes) else str(model)
        if self.format.runtime == "onnxruntime":
            self._open_onnx(source)
        else:
            self._open_litert(source)

    @property
    def image_size(self) -> int:
        return int(self.input["shape"][1])

    # ------------------------------------------------------------------------- ONNX Runtime

    def _open_onnx(self, source: bytes | str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
            raise ExportError(f"onnx: ONNX Runtime cannot load the model: {err}") from err
        inp, out = self._session.get_inputs()[0], self._session.get_outputs()[0]
        self.input = {"name": inp.name, "shape": _dims(inp.shape), "dtype": _onnx_dtype(inp.type)}
        self.output = {"name": out.name, "shape": _dims(out.shape), "dtype": _onnx_dtype(out.type)}
        self._run = self._run_onnx

    def _run_onnx(self, images: np.ndarray) -> np.ndarray:
        return self._session.run([self.output["name"]], {self.input["name"]: images})[0]

    # ------------------------------------------------------------------------- LiteRT

    def _open_litert(self, source: bytes | str) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            if isinstance(source, bytes):
                self._interpreter = Interpreter(model_content=source, num_threads=self.threads)
            else:
                self._interpreter = Interpreter(model_path=source, num_threads=self.threads)
        except (ValueError, RuntimeError) as err:
            raise ExportError(f"{self.format.name}: LiteRT cannot load the model: {err}") from err
        self._in = self._interpreter.get_input_details()[0]
        self._out = self._interpreter.get_output_details()[0]
        self.input, self.output = _litert_tensor(self._in), _litert_tensor(self._out)
        self._batch = -1
        self._run = self._run_litert

    def _run_litert(self, images: np.ndarray) -> np.ndarray:
        if len(images) != self._batch:
            self._interpreter.resize_tensor_input(self._in["index"], list(images.shape))
            self._interpreter.allocate_tensors()
            self._batch = len(images)
        quant = self.input.get("quantization")
        if quant:
            info = np.iinfo(self._in["dtype"])
            images = np.clip(np.round(images / quant["scale"]) + quant["zero_point"], info.min, info.max)
            images = images.astype(self._in["dtype"])
        self._interpreter.set_tensor(self._in["index"], images)
        self._interpreter.invoke()
        result = self._interpreter.get_tensor(self._out["index"])
        quant = self.output.get("quantization")
        if quant:
            result = (result.astype(np.float32) - quant["zero_point"]) * quant["scale"]
        return result

    # ------------------------------------------------------------------------- both

    def logits(self, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """float32 logits of `images` (float32 [N, H, W, C]), `batch_size` images per call."""
        images = np.asarray(images, np.float32)
        expected = self.input["shape"][1:]
        if images.ndim != 4 or any(e is not None and e != s for e, s in zip(expected, images.shape[1:])):
            takes = ", ".join(map(str, expected))
            raise ExportError(f"{self.format.name}: images of shape {list(images.shape)}; the model takes [N, {takes}]")
        parts = [self._run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)


def _dims(shape: list[Any]) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _onnx_dtype(name: str) -> str:
    return {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}.get(name, name)


def _litert_tensor(detail: dict) -> dict:
    described: dict[str, Any] = {
        "name": detail["name"],
        "shape": _dims([int(d) for d in detail.get("shape_signature", detail["shape"])]),
        "dtype": np.dtype(detail["dtype"]).name,
    }
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if scale:
        described["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return described
