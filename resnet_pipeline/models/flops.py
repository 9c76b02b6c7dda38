"""Multiply-adds of a Keras model for one input, the "FLOPs" of He et al. (2015), Table 1."""

from __future__ import annotations

import math

import keras

_COUNTED = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass of one image (batch size 1).

    Convolutions count H_out * W_out * K_h * K_w * C_in / groups * C_out (the kernel holds
    K_h * K_w * C_in / groups * C_out weights); Dense layers in * out per output position. Biases,
    BN, additions, activations and pooling are left out, as in the paper. Nested models are
    counted layer by layer. Needs a model whose spatial input size is known.
    """
    return sum(layer_multiply_adds(layer) for layer in model.layers)


def layer_multiply_adds(layer: keras.layers.Layer) -> int:
    """Multiply-adds of one layer for one image: 0 for the layers the paper does not count."""
    if isinstance(layer, keras.Model):
        return multiply_adds(layer)
    if not isinstance(layer, _COUNTED):
        return 0
    positions = layer.output.shape[1:-1]  # the spatial output positions (none for a Dense on vectors)
    if any(d is None for d in positions):
        raise ValueError(
            f"multiply_adds: layer {layer.name!r} has output shape {tuple(layer.output.shape)}; "
            "allowed: a model built for a fixed input size"
        )
    return int(math.prod(positions) * math.prod(layer.kernel.shape))
