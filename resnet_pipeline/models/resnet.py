"""ResNets of He et al. (2015) from one depth table.

`SPECS[variant][depth]` names the block and the number of blocks per stage; one loop builds every
model. Layer names follow the paper's stages (`conv2_block1_1_conv`, ...), as keras.applications
does, so a summary reads against Table 1 of the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
from keras import layers


class Stage(NamedTuple):
    filters: int  # output channels of the stage's blocks (before the bottleneck expansion)
    blocks: int
    stride: int  # stride of the stage's first block


class Spec(NamedTuple):
    block: str  # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
    stages: tuple[Stage, ...]
    stem: str  # "cifar": 3x3/1 conv; "imagenet": 7x7/2 conv and 3x3/2 max-pool


def _imagenet(block: str, repeats: tuple[int, int, int, int]) -> Spec:
    return Spec(block, tuple(Stage(f, n, s) for f, n, s in zip((64, 128, 256, 512), repeats, (1, 2, 2, 2))), "imagenet")


def _cifar(depth: int) -> Spec:
    n = (depth - 2) // 6
    return Spec("basic", tuple(Stage(f, n, s) for f, s in ((16, 1), (32, 2), (64, 2))), "cifar")


SPECS: dict[str, dict[int, Spec]] = {
    "v1": {
        18: _imagenet("basic", (2, 2, 2, 2)),
        34: _imagenet("basic", (3, 4, 6, 3)),
        50: _imagenet("bottleneck", (3, 4, 6, 3)),
        101: _imagenet("bottleneck", (3, 4, 23, 3)),
        152: _imagenet("bottleneck", (3, 8, 36, 3)),
    },
    "cifar": {depth: _cifar(depth) for depth in (20, 32, 44, 56, 110)},
}

BOTTLENECK_EXPANSION = 4


def allowed_depths(variant: str) -> tuple[int, ...]:
    return tuple(SPECS.get(variant, {}))


def total_stride(variant: str, depth: int) -> int:
    """How much the network downsamples: the smallest input side it can take."""
    spec = SPECS[variant][depth]
    return (4 if spec.stem == "imagenet" else 1) * 2 ** sum(s.stride == 2 for s in spec.stages)


@keras.saving.register_keras_serializable(package="resnet_pipeline")
class ZeroPadShortcut(layers.Layer):
    """Option A shortcut of the paper's CIFAR nets: subsample by `stride`, zero-pad the channels."""

    def __init__(self, filters: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stride = stride

    def call(self, x):
        x = x[:, :: self.stride, :: self.stride, :]
        missing = self.filters - x.shape[-1]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [missing // 2, missing - missing // 2]])

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        out = lambda d: None if d is None else (d + self.stride - 1) // self.stride  # noqa: E731
        return (b, out(h), out(w), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


class _Ops:
    """Conv and BN factories sharing the regularizer and BN settings of one model."""

    def __init__(self, weight_decay: float, bn_momentum: float, bn_epsilon: float):
        self.reg = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
        self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon

    def conv(self, x, filters: int, kernel: int, stride: int, name: str):
        return layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=self.reg, name=name,
        )(x)

    def bn(self, x, name: str):
        return layers.BatchNormalization(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name)(x)

    def conv_bn(self, x, filters, kernel, stride, name, relu=True):
        x = self.bn(self.conv(x, filters, kernel, stride, f"{name}_conv"), f"{name}_bn")
        return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _basic_block(ops: _Ops, x, filters: int, stride: int, shortcut: str, name: str):
    if stride != 1 or x.shape[-1] != filters:
        if shortcut == "A":
            short = ZeroPadShortcut(filters, stride, name=f"{name}_0_pad")(x)
        else:
            short = ops.conv_bn(x, filters, 1, stride, f"{name}_0", relu=False)
    else:
        short = x
    y = ops.conv_bn(x, filters, 3, stride, f"{name}_1")
    y = ops.conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = layers.Add(name=f"{name}_add")([short, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _bottleneck_block(ops: _Ops, x, filters: int, stride: int, shortcut: str, name: str):
    out_filters = filters * BOTTLENECK_EXPANSION
    if stride != 1 or x.shape[-1] != out_filters:
        short = ops.conv_bn(x, out_filters, 1, stride, f"{name}_0", relu=False)
    else:
        short = x
    y = ops.conv_bn(x, filters, 1, 1, f"{name}_1")
    y = ops.conv_bn(y, filters, 3, stride, f"{name}_2")  # v1.5: the stride sits on the 3x3
    y = ops.conv_bn(y, out_filters, 1, 1, f"{name}_3", relu=False)
    y = layers.Add(name=f"{name}_add")([short, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


BLOCKS = {"basic": _basic_block, "bottleneck": _bottleneck_block}


def build_resnet(
    depth: int,
    variant: str = "cifar",
    *,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    shortcut: str | None = None,
    weight_decay: float = 0.0,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
) -> keras.Model:
    """Build ResNet-`depth` of `variant` ("cifar" or "v1") with a softmax-free logits head.

    `shortcut` where shapes change: "A" zero-pads an identity (the paper's CIFAR choice, the
    default for "cifar"), "B" projects with a 1x1 convolution (the default for "v1").
    """
    if variant not in SPECS:
        raise ValueError(f"variant: received {variant!r}; allowed: {', '.join(SPECS)}")
    if depth not in SPECS[variant]:
        raise ValueError(
            f"depth: received {depth} for variant {variant!r}; allowed: {', '.join(map(str, SPECS[variant]))}"
        )
    if shortcut is None:
        shortcut = "A" if variant == "cifar" else "B"
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut: received {shortcut!r}; allowed: 'A' (zero-padded identity) or 'B' (projection)")
    if num_classes < 2:
        raise ValueError(f"num_classes: received {num_classes}; allowed: 2 or more")
    spec = SPECS[variant][depth]
    stride = total_stride(variant, depth)
    if len(input_shape) != 3 or min(input_shape[:2]) < stride:
        raise ValueError(
            f"input_shape: received {tuple(input_shape)}; ResNet-{depth} ({variant}) needs (height, width, channels) "
            f"with height and width of at least its total stride, {stride}"
        )

    ops = _Ops(weight_decay, bn_momentum, bn_epsilon)
    inputs = keras.Input(shape=input_shape, name="image")
    if spec.stem == "imagenet":
        x = ops.conv_bn(inputs, 64, 7, 2, "conv1")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)
    else:
        x = ops.conv_bn(inputs, spec.stages[0].filters, 3, 1, "conv1")
    block = BLOCKS[spec.block]
    for stage_index, stage in enumerate(spec.stages, start=2):
        for b in range(stage.blocks):
            x = block(ops, x, stage.filters, stage.stride if b == 0 else 1, shortcut, f"conv{stage_index}_block{b + 1}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(num_classes, kernel_regularizer=ops.reg, name="logits")(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}_{variant}")
