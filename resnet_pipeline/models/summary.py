"""The layer table of a model with parameters and multiply-adds per layer, for `resnet-pipeline model summary`."""

from __future__ import annotations

import math

import keras

from resnet_pipeline.models.flops import layer_multiply_adds


def _weights_size(weights) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def layer_rows(model: keras.Model) -> list[dict]:
    """One row per layer: name, type, output shape (without the batch), parameters, multiply-adds."""
    rows = []
    for layer in model.layers:
        shape = layer.output.shape[1:]
        rows.append(
            {
                "name": layer.name,
                "type": type(layer).__name__,
                "output": "x".join("?" if d is None else str(d) for d in shape),
                "params": layer.count_params() if layer.weights else 0,
                "multiply_adds": layer_multiply_adds(layer),
            }
        )
    return rows


def totals(model: keras.Model) -> dict:
    """Trainable, non-trainable and total parameters, and multiply-adds for one image."""
    trainable = _weights_size(model.trainable_weights)
    non_trainable = _weights_size(model.non_trainable_weights)
    return {
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
        "total_params": trainable + non_trainable,
        "multiply_adds": sum(layer_multiply_adds(layer) for layer in model.layers),
    }


def format_summary(model: keras.Model, title: str) -> str:
    """The layer table and the totals as text."""
    rows = layer_rows(model)
    name_w = max(len("layer"), *(len(r["name"]) for r in rows))
    type_w = max(len("type"), *(len(r["type"]) for r in rows))
    out_w = max(len("output"), *(len(r["output"]) for r in rows))
    header = f"{'layer':<{name_w}}  {'type':<{type_w}}  {'output':<{out_w}}  {'params':>12}  {'multiply-adds':>15}"
    lines = [title, header, "-" * len(header)]
    for r in rows:
        macs = f"{r['multiply_adds']:,}" if r["multiply_adds"] else ""
        params = f"{r['params']:,}" if r["params"] else ""
        lines.append(f"{r['name']:<{name_w}}  {r['type']:<{type_w}}  {r['output']:<{out_w}}  {params:>12}  {macs:>15}")
    t = totals(model)
    lines += [
        "-" * len(header),
        f"layers:               {len(rows):,}",
        f"trainable params:     {t['trainable_params']:,}",
        f"non-trainable params: {t['non_trainable_params']:,}",
        f"total params:         {t['total_params']:,}",
        f"multiply-adds:        {t['multiply_adds']:,} ({t['multiply_adds'] / 1e9:.3f} G) for one "
        f"{'x'.join(str(d) for d in model.input_shape[1:])} image",
    ]
    return "\n".join(lines)
