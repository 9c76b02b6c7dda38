"""A Keras model as the bytes of an export format; the model's output (logits) is the export's output.

- `onnx`: Keras' own export (`model.export(format="onnx")`, which traces the model with TensorFlow and
  converts the graph with tf2onnx), opset `ONNX_OPSET`, batch dimension free.
- `litert`: the model traced into a SavedModel by Keras' `ExportArchive` (as Keras' own LiteRT export
  does), converted by TensorFlow's LiteRT converter with the built-in ops only (no TensorFlow ops,
  which need the Flex delegate that `ai_edge_litert` does not ship), float32.
- `litert-int8`: the same, fully integer: post-training quantization calibrated on the images given,
  weights int8 per output channel (convolutions; the converter's default), activations int8 per
  tensor, the input and output int8 too. The converter leaves an op it has no int8 kernel for in
  float32 between a DEQUANTIZE and a QUANTIZE without a word; the file is read back and such a
  model refused, naming its layers.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline.exports.formats import ExportError, get_format
from resnet_pipeline.models.resnet import recursion_limit

log = logging.getLogger(__name__)

ONNX_OPSET = 17  # ONNX Runtime runs 7-23; 17 is the newest opset tf2onnx 1.17 fully covers
INPUT_NAME = "image"  # the builder's keras.Input


def input_spec(model: keras.Model) -> tf.TensorSpec:
    """float32 NHWC images of the model's size, any batch."""
    return tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=INPUT_NAME)


def convert(model: keras.Model, fmt: str, calibration: np.ndarray | None = None) -> bytes:
    """The bytes of `model` in format `fmt`; `litert-int8` needs its `calibration` images (float32,
    preprocessed as for the model)."""
    spec = get_format(fmt)
    if spec.int8 and (calibration is None or len(calibration) == 0):
        raise ExportError(f"{fmt}: the int8 conversion needs calibration images, received none")
    with recursion_limit():  # tracing ResNet-1202 goes deeper than Python's default limit
        if fmt == "onnx":
            return to_onnx(model)
        return to_litert(model, calibration if spec.int8 else None)


def to_onnx(model: keras.Model) -> bytes:
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp, warnings.catch_warnings():
        # Keras patches tf2onnx for NumPy 2 by probing `np.object`, which NumPy answers with a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "model.onnx"
        try:
            model.export(
                str(path), format="onnx", verbose=False, input_signature=[input_spec(model)], opset_version=ONNX_OPSET
            )
        except Exception as err:  # tf2onnx raises whatever its handlers raise; name the layer if it says which
            problem = f"{_at(err, model)}: {_first_line(err)}"
            raise ExportError(f"onnx: tf2onnx could not convert the model{problem}") from err
        return path.read_bytes()


def to_litert(model: keras.Model, calibration: np.ndarray | None = None) -> bytes:
    """The LiteRT flatbuffer of `model`: float32, or with `calibration` full-integer int8."""
    fmt = "litert" if calibration is None else "litert-int8"
    with tempfile.TemporaryDirectory(prefix="litert-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serve", functools.partial(model.__call__, training=False), input_signature=[input_spec(model)]
        )
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if calibration is not None:
            images = np.asarray(calibration, np.float32)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        try:
            content = converter.convert()
        except Exception as err:  # ConverterError and the MLIR passes' errors; they name the op's location
            raise ExportError(
                f"{fmt}: the LiteRT converter could not convert the model{_at(err, model)}: {_first_line(err)}"
            ) from err
    if calibration is not None:
        refuse_float_ops(content, model)
    return content


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:500] if lines else type(err).__name__


def layers_in(text: str, model: keras.Model) -> list[str]:
    """The names of `model`'s layers that `text` (a tensor name, a converter's message) mentions as a
    scope: `resnet20_cifar_1/conv4_block3_2_conv_1/convolution` names `conv4_block3_2_conv`."""
    found = []
    for layer in model.layers:
        if re.search(rf"(?:^|[/\"' ]){re.escape(layer.name)}(?:_\d+)?/", text):
            found.append(layer.name)
    return found


def _at(err: BaseException, model: keras.Model) -> str:
    names = layers_in(str(err), model)
    return f" at layer {', '.join(map(repr, names[:5]))}" if names else ""


# ------------------------------------------------------------------ reading a LiteRT file back


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _op_names() -> dict[int, str]:
    schema = _schema()
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)}


def litert_ops(content: bytes) -> list[dict]:
    """Every op of the main graph: `{"op", "inputs", "outputs"}`, each tensor as `{"name", "type",
    "scales"}` (type: the schema's TensorType name; scales: how many quantization scales it has)."""
    schema = _schema()
    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(0)
    types = {v: k for k, v in vars(schema.TensorType).items() if isinstance(v, int)}
    names = _op_names()

    def tensor(index: int) -> dict:
        t = graph.Tensors(index)
        quant = t.Quantization()
        return {
            "name": (t.Name() or b"").decode(errors="replace"),
            "type": types.get(t.Type(), str(t.Type())),
            "scales": quant.ScaleLength() if quant is not None else 0,
        }

    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # codes above 127 live in the first
        ops.append(
            {
                "op": names.get(builtin, str(builtin)),
                "inputs": [tensor(j) for j in op.InputsAsNumpy() if j >= 0],
                "outputs": [tensor(j) for j in op.OutputsAsNumpy() if j >= 0],
            }
        )
    return ops


def refuse_float_ops(content: bytes, model: keras.Model) -> None:
    """An int8 export with an op left in float32 is refused, naming the layers (or tensors) of those ops."""
    left = [
        op
        for op in litert_ops(content)
        if op["op"] not in ("QUANTIZE", "DEQUANTIZE")
        and any(t["type"] == "FLOAT32" for t in op["inputs"] + op["outputs"])
    ]
    if not left:
        return
    places = []
    for op in left:
        tensor_name = op["outputs"][0]["name"] if op["outputs"] else "?"
        layers = layers_in(tensor_name, model)
        where = f"layer {layers[-1]!r}" if layers else f"tensor {tensor_name!r}"
        places.append(f"{where} ({op['op']})")
    raise ExportError(
        f"litert-int8: {', '.join(dict.fromkeys(places))} cannot be quantized to int8: LiteRT has no int8 kernel "
        "for it, and the converter left it in float32, so the model would not be fully integer; export "
        "the float format (litert) for this model, or replace the layer"
    )


def weight_quantization(content: bytes) -> dict[str, int]:
    """How the weights of the convolutions and dense layers of an int8 file are quantized: how many
    have a scale per output channel, how many one scale."""
    counts = {"per_channel": 0, "per_tensor": 0}
    for op in litert_ops(content):
        if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op["inputs"]) > 1:
            counts["per_channel" if op["inputs"][1]["scales"] > 1 else "per_tensor"] += 1
    return counts
