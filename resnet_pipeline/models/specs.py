"""The ResNet depth table and the checks of the builder's options, without TensorFlow.

`SPECS[variant][depth]` names the block, the blocks per stage and whether the block is
pre-activated (see `resnet.py`, which builds every model from it with one loop). Config reads
this module to check `train.*` before any stage starts, so a command that does not build a model
never imports TensorFlow.
"""

from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    filters: int  # output channels of the stage's blocks (before the bottleneck expansion)
    blocks: int
    stride: int  # stride of the stage's first block


class Architecture(NamedTuple):
    """One entry of the depth table: the network's blocks, stages and stem."""

    block: str  # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
    stages: tuple[Stage, ...]
    stem: str  # "cifar": 3x3/1 conv; "imagenet": 7x7/2 conv and 3x3/2 max-pool
    preact: bool = False  # v2: BN-ReLU before each convolution instead of after


BOTTLENECK_EXPANSION = 4

# depth: (block, blocks per stage conv2..conv5) -- Table 1 of the 2015 paper; 200 from the 2016 one.
_IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def _imagenet(depth: int, preact: bool) -> Architecture:
    block, repeats = _IMAGENET[depth]
    stages = tuple(Stage(f, n, s) for f, n, s in zip((64, 128, 256, 512), repeats, (1, 2, 2, 2)))
    return Architecture(block, stages, "imagenet", preact)


def _cifar(depth: int) -> Architecture:
    n = (depth - 2) // 6
    return Architecture("basic", tuple(Stage(f, n, s) for f, s in ((16, 1), (32, 2), (64, 2))), "cifar")


SPECS: dict[str, dict[int, Architecture]] = {
    "cifar": {depth: _cifar(depth) for depth in (20, 32, 44, 56, 110, 1202)},
    "v1": {depth: _imagenet(depth, preact=False) for depth in (18, 34, 50, 101, 152)},
    "v2": {depth: _imagenet(depth, preact=True) for depth in (18, 34, 50, 101, 152, 200)},
}


class Variant(NamedTuple):
    family: str  # its table in SPECS
    stride_in_1x1: bool  # bottlenecks: the stride on the first 1x1, else on the 3x3


# The variants by name, in params (train.variant) and on the command line (--variant) alike.
VARIANTS: dict[str, Variant] = {
    "v1": Variant("v1", True),  # the 2015 paper, Caffe and keras.applications: stride on the 1x1
    "v1.5": Variant("v1", False),  # torchvision and NVIDIA: stride on the 3x3
    "v2": Variant("v2", False),  # pre-activation (2016)
    "cifar": Variant("cifar", False),  # the paper's CIFAR-10 nets (6n+2 layers of basic blocks)
}

POOLINGS = ("avg", "max", None)


def allowed_depths(variant: str) -> tuple[int, ...]:
    return tuple(SPECS.get(variant, {}))


def total_stride(variant: str, depth: int) -> int:
    """How much the network downsamples: the smallest input side it can take."""
    spec = SPECS[variant][depth]
    return (4 if spec.stem == "imagenet" else 1) * 2 ** sum(s.stride == 2 for s in spec.stages)


def default_shortcut(variant: str) -> str:
    """The paper's shortcut: A (zero-padded identity) for the CIFAR nets, B (projection) otherwise."""
    return "A" if variant == "cifar" else "B"


def block_strides(spec: Architecture, stride_last: bool = False) -> list[list[int]]:
    """The stride of every block, stage by stage.

    A stage's stride sits on its first block; with `stride_last` (keras.applications ResNetV2) it
    moves to the last block of the stage before, so conv2..conv4 end with a stride-2 block and
    conv5 has none. The total stride is the same.
    """
    if not stride_last:
        return [[stage.stride] + [1] * (stage.blocks - 1) for stage in spec.stages]
    moved = [stage.stride for stage in spec.stages[1:]] + [1]
    return [[1] * (stage.blocks - 1) + [stride] for stage, stride in zip(spec.stages, moved)]


def _check_arguments(
    depth,
    variant,
    *,
    input_shape,
    num_classes,
    shortcut,
    pooling,
    include_top,
    stride_in_1x1,
    v2_stride_last,
    use_bias,
    zero_init_residual,
    weight_decay,
    bn_momentum,
    bn_epsilon,
) -> Architecture:
    """Raise ValueError naming the argument, the value received and what is allowed; return the spec."""
    if variant not in SPECS:
        raise ValueError(f"variant: received {variant!r}; allowed: {', '.join(map(repr, SPECS))}")
    if depth not in SPECS[variant]:
        raise ValueError(
            f"depth: received {depth!r} for variant {variant!r}; allowed: {', '.join(map(str, SPECS[variant]))}"
        )
    spec = SPECS[variant][depth]
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut: received {shortcut!r}; allowed: 'A' (zero-padded identity) or 'B' (projection)")
    if shortcut == "A" and spec.block == "bottleneck":
        raise ValueError(
            f"shortcut: received 'A' for ResNet-{depth} ({variant}), whose bottleneck blocks change the width "
            "within a stage; allowed: 'B' (projection), or 'A' with depths of basic blocks"
        )
    if stride_in_1x1 and spec.block != "bottleneck":
        raise ValueError(
            f"stride_in_1x1: received True for ResNet-{depth} ({variant}), whose basic blocks have no 1x1 "
            "convolution; allowed: False, or True with bottleneck depths"
        )
    if v2_stride_last and variant != "v2":
        raise ValueError(f"v2_stride_last: received True for variant {variant!r}; allowed: True only for 'v2'")
    for name, value in (
        ("stride_in_1x1", stride_in_1x1),
        ("v2_stride_last", v2_stride_last),
        ("include_top", include_top),
        ("zero_init_residual", zero_init_residual),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: received {value!r}; allowed: True or False")
    if use_bias is not None and not isinstance(use_bias, bool):
        raise ValueError(f"use_bias: received {use_bias!r}; allowed: True, False or None (the layout's own)")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: received {pooling!r}; allowed: 'avg', 'max' or None")
    if include_top and pooling is None:
        raise ValueError("pooling: received None with include_top=True; allowed: 'avg' or 'max' before the logits")
    if include_top and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes: received {num_classes!r}; allowed: an integer of 2 or more")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay: received {weight_decay!r}; allowed: a number >= 0")
    if not (isinstance(bn_momentum, (int, float)) and 0 <= bn_momentum < 1):
        raise ValueError(f"bn_momentum: received {bn_momentum!r}; allowed: 0 <= bn_momentum < 1")
    if not (isinstance(bn_epsilon, (int, float)) and bn_epsilon > 0):
        raise ValueError(f"bn_epsilon: received {bn_epsilon!r}; allowed: a number > 0")
    stride = total_stride(variant, depth)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else input_shape
    sides_ok = (
        isinstance(shape, tuple)
        and len(shape) == 3
        and all(d is None or (isinstance(d, int) and d >= stride) for d in shape[:2])
    )
    if not sides_ok or not (isinstance(shape[2], int) and shape[2] >= 1):
        raise ValueError(
            f"input_shape: received {shape}; ResNet-{depth} ({variant}) needs (height, width, channels) "
            f"with height and width of at least its total stride, {stride} (or None), and 1 or more channels"
        )
    return spec


# The options that rebuild keras.applications' ResNet50/101/152 and ResNet50V2/101V2/152V2 layer for layer.
KERAS_APPLICATIONS_LAYOUT = {
    "v1": dict(stride_in_1x1=True, use_bias=True, bn_epsilon=1.001e-5, bn_momentum=0.99),
    "v2": dict(v2_stride_last=True, bn_epsilon=1.001e-5, bn_momentum=0.99),
}


def model_arguments(train, num_classes: int, channels: int = 3) -> dict:
    """`build_resnet` keyword arguments from params.yaml's `train:` group (a TrainConfig), checked.

    Raises the builder's ValueError, which names the option, for a combination it cannot build.
    """
    variant = VARIANTS[train.variant]
    bottleneck = train.depth in SPECS[variant.family] and SPECS[variant.family][train.depth].block == "bottleneck"
    kwargs = dict(
        depth=train.depth,
        variant=variant.family,
        input_shape=(train.image_size, train.image_size, channels),
        num_classes=num_classes,
        shortcut=None if train.shortcut == "auto" else train.shortcut,
        bn_momentum=train.bn_momentum,
        bn_epsilon=train.bn_epsilon,
        sync_bn=train.sync_bn,
        stride_in_1x1=variant.stride_in_1x1 and bottleneck,  # basic blocks have no 1x1
        v2_stride_last=train.v2_stride_last,
        use_bias=train.use_bias,
        zero_init_residual=train.zero_init_residual,
    )
    checked = dict(kwargs, shortcut=kwargs["shortcut"] or default_shortcut(variant.family), weight_decay=0.0)
    del checked["sync_bn"]
    _check_arguments(**checked, pooling="avg", include_top=True)
    return kwargs
