"""ResNets of He et al. from one depth table.

`SPECS[variant][depth]` names the block, the blocks per stage and whether the block is
pre-activated; one loop builds every model:

- "cifar": the CIFAR-10 nets of the 2015 paper (3x3 stem, 16/32/64 filters, depth 6n+2).
- "v1": the ImageNet nets of the 2015 paper (Table 1). By default the stride of a bottleneck sits
  on its 3x3 convolution ("v1.5", as torchvision); `stride_in_1x1=True` puts it on the first 1x1
  as the paper's Caffe models and keras.applications.ResNet50/101/152 do.
- "v2": the pre-activation nets of "Identity Mappings in Deep Residual Networks" (2016): BN-ReLU
  before each convolution, a final BN-ReLU (`post_bn`, `post_relu`) before pooling.
  `v2_stride_last=True` is the layout of keras.applications.ResNet50V2/101V2/152V2.

Layer names follow keras.applications (`conv1_conv`, `pool1_pool`, `conv2_block1_1_conv`, `_bn`,
`_relu`, `_add`, `_out`, `post_bn`), so a summary reads against Table 1 of the paper and weights
copy over by name. A strided convolution wider than 1x1 is an explicit symmetric `ZeroPadding2D`
(`<name>_pad`) and a "valid" convolution, as in keras.applications and torchvision: TensorFlow's
"same" pads a strided convolution of an even-sized input on the bottom and right only.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import keras
import tensorflow as tf
from keras import layers

from resnet_pipeline.models.specs import (  # noqa: F401 - the table and its checks, re-exported
    BOTTLENECK_EXPANSION,
    KERAS_APPLICATIONS_LAYOUT,
    POOLINGS,
    SPECS,
    Architecture,
    Stage,
    _check_arguments,
    allowed_depths,
    block_strides,
    default_shortcut,
    model_arguments,
    total_stride,
)

# the names `_check_arguments` takes, all of them arguments of `build_resnet` too
CHECKED_ARGUMENTS = tuple(inspect.signature(_check_arguments).parameters)


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


@keras.saving.register_keras_serializable(package="resnet_pipeline")
class SyncBatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training statistics are those of the global batch, over all replicas.

    The mean is all-reduced first, then the mean squared deviation from it: the two passes of
    `tf.nn.moments` on one device. (Keras' `synchronized=True` all-reduces the sums of x and x^2
    and takes E[x^2] - E[x]^2, whose cancellation changes ResNet-20's first gradients by ~2 % from
    one device's, so replicas could not reproduce a one-device run.)
    """

    def __init__(self, **kwargs):
        kwargs.pop("synchronized", None)
        super().__init__(**kwargs)

    def _moments(self, inputs, mask):
        replica = tf.distribute.get_replica_context()
        if mask is not None or replica is None:
            return super()._moments(inputs, mask)
        x = tf.cast(inputs, tf.float32)
        axes = list(self._reduction_axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
        count = replica.all_reduce(tf.distribute.ReduceOp.SUM, count)
        mean = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(x, axes, keepdims=True)) / count
        deviation = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes, keepdims=True)
        variance = replica.all_reduce(tf.distribute.ReduceOp.SUM, deviation) / count
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        if inputs.dtype != tf.float32:  # as Keras: statistics in float32, returned in the input's dtype
            limit = inputs.dtype.max
            mean = tf.cast(tf.clip_by_value(mean, -limit, limit), inputs.dtype)
            variance = tf.cast(tf.clip_by_value(variance, -limit, limit), inputs.dtype)
        return mean, variance


class _Builder:
    """Layer factories and the stem, block and head of one model, sharing its settings."""

    def __init__(
        self,
        spec: Architecture,
        *,
        shortcut: str,
        stride_in_1x1: bool,
        zero_init_residual: bool,
        bias_before_bn: bool,
        bias_elsewhere: bool,
        weight_decay: float,
        bn_momentum: float,
        bn_epsilon: float,
        sync_bn: bool = False,
    ):
        self.spec, self.shortcut = spec, shortcut
        self.stride_in_1x1, self.zero_init_residual = stride_in_1x1, zero_init_residual
        self.bias_before_bn, self.bias_elsewhere = bias_before_bn, bias_elsewhere
        self.reg = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
        self.bn_momentum, self.bn_epsilon, self.sync_bn = bn_momentum, bn_epsilon, sync_bn

    # --- layers -----------------------------------------------------------------------------

    def conv(self, x, filters: int, kernel: int, stride: int, name: str, before_bn: bool = True):
        padding = "same"  # symmetric for odd kernels at stride 1
        if kernel > 1 and stride > 1:
            x, padding = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x), "valid"
        return layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding=padding,
            use_bias=self.bias_before_bn if before_bn else self.bias_elsewhere,
            kernel_initializer="he_normal",
            kernel_regularizer=self.reg,
            name=f"{name}_conv",
        )(x)

    def bn(self, x, name: str, zero_gamma: bool = False):
        kind = SyncBatchNormalization if self.sync_bn else layers.BatchNormalization
        return kind(
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            gamma_initializer="zeros" if zero_gamma else "ones",
            name=f"{name}_bn",
        )(x)

    @staticmethod
    def relu(x, name: str):
        return layers.Activation("relu", name=name)(x)

    # --- network parts ----------------------------------------------------------------------

    def stem(self, x):
        """conv1 (3x3/1 for CIFAR, 7x7/2 and a 3x3/2 max-pool for ImageNet); v2 leaves the BN-ReLU
        to the first block's pre-activation."""
        preact, imagenet = self.spec.preact, self.spec.stem == "imagenet"
        kernel, stride = (7, 2) if imagenet else (3, 1)
        x = self.conv(x, self.spec.stages[0].filters, kernel, stride, "conv1", before_bn=not preact)
        if not preact:
            x = self.relu(self.bn(x, "conv1"), "conv1_relu")
        if imagenet:
            # zeros pad as -inf would after a ReLU; v2 pads with zeros too, as keras.applications
            x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
            x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
        return x

    def block(self, x, filters: int, stride: int, name: str):
        """One residual block: shortcut + convolutions, v1 (conv-BN-ReLU) or v2 (BN-ReLU-conv)."""
        preact = self.spec.preact
        bottleneck = self.spec.block == "bottleneck"
        out_filters = filters * BOTTLENECK_EXPANSION if bottleneck else filters
        branch = self.relu(self.bn(x, f"{name}_preact"), f"{name}_preact_relu") if preact else x

        if x.shape[-1] != out_filters and self.shortcut == "A":
            short = ZeroPadShortcut(out_filters, stride, name=f"{name}_0_pad")(x)
        elif x.shape[-1] != out_filters:  # option B: 1x1 projection (v2: of the pre-activation)
            short = self.conv(branch, out_filters, 1, stride, f"{name}_0", before_bn=not preact)
            short = short if preact else self.bn(short, f"{name}_0")
        elif stride > 1:  # same channels, smaller map: subsample (v2 with the stride last)
            short = layers.MaxPooling2D(1, strides=stride, name=f"{name}_0_pool")(x)
        else:
            short = x

        if bottleneck:
            first, middle = (stride, 1) if self.stride_in_1x1 else (1, stride)
            convs = [(filters, 1, first), (filters, 3, middle), (out_filters, 1, 1)]
        else:
            convs = [(filters, 3, stride), (filters, 3, 1)]
        y = branch
        for i, (f, kernel, s) in enumerate(convs, start=1):
            last = i == len(convs)
            y = self.conv(y, f, kernel, s, f"{name}_{i}", before_bn=not (preact and last))
            if preact and last:
                break
            # zero_init_residual: the block's last BN (v2: the one before its last conv) starts at 0
            zero = self.zero_init_residual and i == len(convs) - (1 if preact else 0)
            y = self.bn(y, f"{name}_{i}", zero_gamma=zero)
            if not last:
                y = self.relu(y, f"{name}_{i}_relu")
        if preact:  # keras.applications ResNetV2 names the sum `_out`
            return layers.Add(name=f"{name}_out")([short, y])
        y = layers.Add(name=f"{name}_add")([short, y])
        return self.relu(y, f"{name}_out")


def build_resnet(
    depth: int,
    variant: str = "cifar",
    *,
    input_shape: tuple[int | None, int | None, int] = (32, 32, 3),
    num_classes: int = 10,
    shortcut: str | None = None,
    weight_decay: float = 0.0,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    stride_in_1x1: bool = False,
    v2_stride_last: bool = False,
    use_bias: bool | None = None,
    zero_init_residual: bool = False,
    sync_bn: bool = False,
    include_top: bool = True,
    pooling: str | None = "avg",
) -> keras.Model:
    """Build ResNet-`depth` of `variant` ("cifar", "v1" or "v2"); the head returns logits (no softmax).

    shortcut: where the width changes, "A" zero-pads a subsampled identity (the paper's CIFAR
        choice, the default for "cifar"; basic blocks only), "B" projects with a 1x1 convolution
        (the default for "v1" and "v2").
    stride_in_1x1: bottlenecks only; False strides the 3x3 (torchvision, "v1.5"), True the first
        1x1 (the paper's Caffe models, keras.applications).
    v2_stride_last: "v2" only; the stride on the last block of the stage before (keras.applications).
    use_bias: True puts a bias in every convolution (keras.applications ResNet), False in none.
        None (default) takes the layout's own: none, except with `v2_stride_last`, where as in
        keras.applications ResNetV2 the convolutions not followed by their own BN (stem,
        projection, each block's last) have one.
    bn_momentum, bn_epsilon: of every BN (keras.applications uses epsilon 1.001e-5).
    zero_init_residual: the gamma of each block's last BN starts at zero, so blocks start as identities.
    include_top: end with a Dense of `num_classes` logits after `pooling` ("avg" or "max"); without
        it the model ends with `pooling` ("avg", "max" or None for the last feature map).
    weight_decay: L2 regularizers on the kernels of the convolutions and the Dense (the trainer
        applies its own decay instead and builds with 0).
    sync_bn: BatchNormalization computes its batch statistics over all replicas (TensorFlow's
        distribution strategies), as on one device with the global batch.

    The logits are computed in float32 whatever the global dtype policy (mixed precision).

    ResNet-1202 is deeper than Python's default recursion limit lets Keras walk its graph: this
    function raises the limit while it builds; to rebuild it from its config, save it or load it
    from a .keras file, do so under `recursion_limit(DEEP_RECURSION_LIMIT)` too.
    """
    shortcut = shortcut or default_shortcut(variant)
    arguments = locals()  # build_resnet's arguments, checked by name before any layer is made
    spec = _check_arguments(**{name: arguments[name] for name in CHECKED_ARGUMENTS})
    b = _Builder(
        spec,
        shortcut=shortcut,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
        bias_before_bn=bool(use_bias),
        bias_elsewhere=use_bias if use_bias is not None else v2_stride_last,
        weight_decay=weight_decay,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        sync_bn=bool(sync_bn),
    )

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = b.stem(inputs)
    for stage_index, (stage, strides) in enumerate(zip(spec.stages, block_strides(spec, v2_stride_last)), start=2):
        for block_index, stride in enumerate(strides, start=1):
            x = b.block(x, stage.filters, stride, f"conv{stage_index}_block{block_index}")
    if spec.preact:
        x = b.relu(b.bn(x, "post"), "post_relu")
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    if include_top:
        x = layers.Dense(num_classes, kernel_regularizer=b.reg, dtype="float32", name="logits")(x)
    with recursion_limit(10 * depth + 1000):  # Keras walks the graph recursively: ResNet-1202 needs it
        return keras.Model(inputs, x, name=f"resnet{depth}_{variant}")


# enough for Keras to walk, save and load every model of the table (ResNet-1202 has ~4,200 layers)
DEEP_RECURSION_LIMIT = 20_000


@contextlib.contextmanager
def recursion_limit(limit: int = DEEP_RECURSION_LIMIT):
    """Raise Python's recursion limit to at least `limit` inside the block."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)
