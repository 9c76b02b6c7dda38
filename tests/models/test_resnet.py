"""ResNets of He et al. (2015) built from the depth table: sizes, names, errors, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline.config import ConfigError, from_dict
from resnet_pipeline.models.flops import multiply_adds
from resnet_pipeline.models.resnet import (
    KERAS_APPLICATIONS_LAYOUT,
    SPECS,
    ZeroPadShortcut,
    allowed_depths,
    block_strides,
    build_resnet,
    model_arguments,
    recursion_limit,
)


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


# Table 6 of the paper: CIFAR-10 ResNets with option A shortcuts.
CIFAR_PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


@pytest.mark.parametrize("depth", sorted(CIFAR_PAPER_PARAMS))
def test_cifar_resnet_size_and_output(depth):
    model = build_resnet(depth, "cifar", num_classes=10)
    count = trainable_params(model)
    assert abs(count - CIFAR_PAPER_PARAMS[depth]) / CIFAR_PAPER_PARAMS[depth] <= 0.02, count
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    y = model(x, training=False)
    assert tuple(y.shape) == (2, 10)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))
    n = (depth - 2) // 6
    names = {layer.name for layer in model.layers}
    weighted = [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(weighted) == depth, "depth counts the conv and dense layers"
    assert f"conv4_block{n}_out" in names and f"conv4_block{n + 1}_1_conv" not in names


# torchvision.models.resnet18/34/50/101/152(): sum(p.numel() for p in m.parameters()), and the
# "GFLOPS" (multiply-adds at 224x224) of their IMAGENET1K_V1 weights in the torchvision docs.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
TORCHVISION_GMACS = {18: 1.81, 34: 3.66, 50: 4.09, 101: 7.80, 152: 11.51}


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_v1_resnet_matches_torchvision_parameter_count(depth):
    # torchvision (like the paper's ImageNet models from Table 3 on) projects the shortcut (option B)
    # and strides the bottleneck's 3x3 ("v1.5"): both are the v1 defaults
    model = build_resnet(depth, "v1", input_shape=(224, 224, 3), num_classes=1000)
    assert trainable_params(model) == TORCHVISION_PARAMS[depth]
    assert tuple(model.output_shape) == (None, 1000)
    assert round(multiply_adds(model) / 1e9, 2) == TORCHVISION_GMACS[depth]


def test_bottleneck_refuses_the_zero_padded_shortcut():
    # a bottleneck widens 4x inside a stage (conv2_block1: 64 -> 256): only a projection fits
    with pytest.raises(ValueError, match=r"shortcut: received 'A'.*ResNet-50.*allowed: 'B'"):
        build_resnet(50, "v1", input_shape=(64, 64, 3), num_classes=10, shortcut="A")
    model = build_resnet(50, "v1", input_shape=(64, 64, 3), num_classes=10)
    assert "conv2_block1_0_conv" in {layer.name for layer in model.layers}


def test_v1_forward_on_small_input():
    model = build_resnet(18, "v1", input_shape=(64, 64, 3), num_classes=5, shortcut="B")
    y = model(np.zeros((1, 64, 64, 3), np.float32), training=False)
    assert tuple(y.shape) == (1, 5)


def test_layer_names_follow_the_paper_stages():
    names = {layer.name for layer in build_resnet(20).layers}
    for name in (
        "conv1_conv",
        "conv1_bn",
        "conv1_relu",
        "conv2_block1_1_conv",
        "conv2_block1_2_bn",
        "conv2_block3_out",
        "conv3_block1_0_pad",
        "conv4_block3_add",
        "avg_pool",
        "logits",
    ):
        assert name in names, name
    assert "conv2_block4_1_conv" not in names and "conv5_block1_1_conv" not in names
    names50 = {layer.name for layer in build_resnet(50, "v1", input_shape=(64, 64, 3)).layers}
    for name in ("pool1_pool", "conv2_block1_0_conv", "conv2_block3_3_conv", "conv4_block6_3_bn", "conv5_block3_out"):
        assert name in names50, name
    assert "conv4_block7_1_conv" not in names50


def test_allowed_depths_follow_the_table():
    assert allowed_depths("cifar") == (20, 32, 44, 56, 110, 1202)
    assert allowed_depths("v1") == (18, 34, 50, 101, 152)
    assert allowed_depths("v2") == (18, 34, 50, 101, 152, 200)
    assert allowed_depths("nope") == ()
    assert set(SPECS) == {"cifar", "v1", "v2"}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(depth=42), "42"),
        (dict(depth=20, variant="v2"), "'v2'"),
        (dict(depth=50, variant="cifar"), "50"),
        (dict(depth=20, input_shape=(2, 2, 3)), "(2, 2, 3)"),
        (dict(depth=18, variant="v1", input_shape=(16, 16, 3)), "(16, 16, 3)"),
        (dict(depth=20, shortcut="C"), "'C'"),
        (dict(depth=20, num_classes=1), "1"),
        (dict(depth=38), "38"),  # 6n+2, but not one of the paper's CIFAR nets
        (dict(depth=200, variant="v1"), "200"),
        (dict(depth=20, variant="v3"), "'v3'"),
        (dict(depth=50, variant="v2", input_shape=(16, 16, 3)), "(16, 16, 3)"),
        (dict(depth=18, variant="v2", input_shape=(64, 64)), "(64, 64)"),
        (dict(depth=18, variant="v2", input_shape=(64, 64, 0)), "(64, 64, 0)"),
        (dict(depth=152, variant="v2", shortcut="A"), "'A'"),
        (dict(depth=18, variant="v1", stride_in_1x1=True), "stride_in_1x1: received True"),
        (dict(depth=20, stride_in_1x1=True), "stride_in_1x1: received True"),
        (dict(depth=50, variant="v1", v2_stride_last=True), "v2_stride_last: received True for variant 'v1'"),
        (dict(depth=20, pooling="mean"), "'mean'"),
        (dict(depth=20, pooling=None), "pooling: received None with include_top=True"),
        (dict(depth=20, use_bias="yes"), "'yes'"),
        (dict(depth=20, bn_momentum=1.0), "1.0"),
        (dict(depth=20, bn_epsilon=0.0), "0.0"),
        (dict(depth=20, weight_decay=-1e-4), "-0.0001"),
    ],
    ids=[
        "depth",
        "variant-depth",
        "depth-of-other-variant",
        "cifar-input-too-small",
        "v1-input-too-small",
        "shortcut",
        "num_classes",
        "cifar-not-in-table",
        "v1-200",
        "variant",
        "v2-input-too-small",
        "input-rank",
        "no-channels",
        "bottleneck-option-A",
        "stride_in_1x1-basic",
        "stride_in_1x1-cifar",
        "v2_stride_last-v1",
        "pooling",
        "top-without-pooling",
        "use_bias",
        "bn_momentum",
        "bn_epsilon",
        "weight_decay",
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        build_resnet(**kwargs)
    assert fragment in str(err.value)


def test_smallest_allowed_input_builds():
    model = build_resnet(20, input_shape=(4, 4, 3))  # total stride of the CIFAR nets is 4
    assert tuple(model(np.zeros((1, 4, 4, 3), np.float32)).shape) == (1, 10)


def test_zero_pad_shortcut_subsamples_and_pads_channels():
    layer = ZeroPadShortcut(8, 2)
    x = np.arange(1 * 5 * 5 * 4, dtype=np.float32).reshape(1, 5, 5, 4) + 1
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (1, 3, 3, 8) == layer.compute_output_shape((1, 5, 5, 4))
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    assert not y[..., :2].any() and not y[..., 6:].any()
    clone = ZeroPadShortcut.from_config(layer.get_config())
    assert (clone.filters, clone.stride) == (8, 2)


def test_get_config_from_config_round_trip():
    model = build_resnet(20, num_classes=7)
    clone = keras.Model.from_config(model.get_config())
    assert [l.name for l in clone.layers] == [l.name for l in model.layers]
    assert trainable_params(clone) == trainable_params(model)
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(clone(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=0,
        atol=1e-6,
    )


def test_save_and_load_in_safe_mode_gives_identical_outputs(tmp_path):
    model = build_resnet(20, num_classes=10, weight_decay=1e-4)
    x = np.random.default_rng(2).random((3, 32, 32, 3), dtype=np.float32)
    model(x, training=True)  # move the BN statistics off their initial values
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert any(isinstance(l, ZeroPadShortcut) for l in loaded.layers)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
    )
    assert len(loaded.losses) == len(model.losses) > 0, "the weight decay regularizers survive"


# --- the whole family: keras.applications, the paper, every table entry ---------------------

# The settings in which ours is keras.applications.ResNet50/101/152 (biases everywhere, stride on
# the first 1x1) and ResNet50V2/101V2/152V2 (stride on the last block of a stage); the BN epsilon
# only matters for the outputs.
KERAS_SETTING = KERAS_APPLICATIONS_LAYOUT  # biases and the stride on the 1x1 (v1), the stride last (v2)

# keras.applications.<model>(weights=None).count_params(), 1000 classes at 224x224x3
KERAS_PARAMS = {
    ("v1", 50): 25_636_712,
    ("v1", 101): 44_707_176,
    ("v1", 152): 60_419_944,
    ("v2", 50): 25_613_800,
    ("v2", 101): 44_675_560,
    ("v2", 152): 60_380_648,
}


@pytest.mark.slow
@pytest.mark.parametrize("variant, depth", sorted(KERAS_PARAMS))
def test_keras_applications_setting_matches_its_parameter_count(variant, depth):
    model = build_resnet(depth, variant, input_shape=(224, 224, 3), num_classes=1000, **KERAS_SETTING[variant])
    assert model.count_params() == KERAS_PARAMS[(variant, depth)]


# Table 1 of the paper: "FLOPs" (multiply-adds) at 224x224 of the original v1 (bottleneck stride on the 1x1)
PAPER_MULTIPLY_ADDS = {18: 1.8e9, 34: 3.6e9, 50: 3.8e9, 101: 7.6e9, 152: 11.3e9}


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(PAPER_MULTIPLY_ADDS))
def test_multiply_adds_match_table_1_of_the_paper(depth):
    bottleneck = SPECS["v1"][depth].block == "bottleneck"
    model = build_resnet(depth, "v1", input_shape=(224, 224, 3), num_classes=1000, stride_in_1x1=bottleneck)
    macs = multiply_adds(model)
    assert abs(macs - PAPER_MULTIPLY_ADDS[depth]) / PAPER_MULTIPLY_ADDS[depth] <= 0.05, macs


def _randomize(model: keras.Model, seed: int) -> None:
    """Move every BN statistic and bias off its initial value, so that copying them is tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.0, shapes[0]),
                    rng.normal(0, 0.1, shapes[1]),
                    rng.normal(0, 0.1, shapes[2]),
                    rng.uniform(0.5, 1.5, shapes[3]),
                ]
            )
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))


def _copy_weights_by_name(source: keras.Model, target: keras.Model, renames: dict[str, str]) -> None:
    targets = {layer.name: layer for layer in target.layers if layer.weights}
    copied = set()
    for layer in source.layers:
        if layer.weights:
            name = renames.get(layer.name, layer.name)
            targets[name].set_weights(layer.get_weights())
            copied.add(name)
    assert copied == set(targets), "every layer with weights has its namesake"


@pytest.mark.slow
@pytest.mark.parametrize("application, variant", [("ResNet50", "v1"), ("ResNet50V2", "v2")])
def test_keras_applications_weights_give_the_same_outputs(application, variant):
    shape, classes = (64, 64, 3), 10  # keras.applications accepts both with weights=None
    reference = getattr(keras.applications, application)(
        weights=None, input_shape=shape, classes=classes, classifier_activation=None
    )
    ours = build_resnet(50, variant, input_shape=shape, num_classes=classes, **KERAS_SETTING[variant])
    assert ours.count_params() == reference.count_params()
    _randomize(reference, seed=3)
    _copy_weights_by_name(reference, ours, {"predictions": "logits"})
    x = np.random.default_rng(4).uniform(-1, 1, (2, *shape)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(reference(x, training=False))
    got = keras.ops.convert_to_numpy(ours(x, training=False))
    assert np.abs(expected).max() > 0.1, "a meaningful comparison"
    assert np.abs(got - expected).max() < 1e-4


EVERY_MODEL = [(variant, depth) for variant in ("cifar", "v1", "v2") for depth in SPECS[variant] if depth != 1202]


def _train_one_step(model: keras.Model, x: np.ndarray, labels: np.ndarray) -> None:
    """One SGD step; every trainable variable must receive a gradient and move."""
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        loss += sum(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    optimizer.apply(grads, model.trainable_variables)
    assert np.isfinite(float(loss))
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) == len(before), "every variable moved"


@pytest.mark.slow
@pytest.mark.parametrize("variant, depth", EVERY_MODEL, ids=[f"{v}-{d}" for v, d in EVERY_MODEL])
def test_every_model_builds_runs_and_trains_a_step(variant, depth):
    model = build_resnet(depth, variant, input_shape=(32, 32, 3), num_classes=10, weight_decay=1e-4)
    x = np.random.default_rng(depth).random((2, 32, 32, 3), dtype=np.float32)
    assert tuple(model(x, training=False).shape) == (2, 10)
    _train_one_step(model, x, np.array([1, 7]))


@pytest.mark.slow
def test_resnet_1202_trains_a_step_and_round_trips_under_the_raised_recursion_limit(tmp_path):
    model = build_resnet(1202, "cifar", input_shape=(32, 32, 3), num_classes=10)
    count = trainable_params(model)  # Table 6 of the paper: 19.4M parameters
    assert abs(count - 19.4e6) / 19.4e6 <= 0.02, count
    x = np.random.default_rng(1202).random((2, 32, 32, 3), dtype=np.float32)
    _train_one_step(model, x, np.array([3, 4]))
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.all(np.isfinite(expected))
    path = tmp_path / "model.keras"
    with recursion_limit():
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), expected)


SERIALIZED = [
    ("cifar", 20, dict(shortcut="B")),
    ("v1", 18, dict(shortcut="A", zero_init_residual=True)),
    ("v1", 50, dict(stride_in_1x1=True, use_bias=True, weight_decay=1e-4)),
    ("v2", 18, dict()),
    ("v2", 50, dict(v2_stride_last=True, include_top=False, pooling="max")),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant, depth, kwargs", SERIALIZED, ids=[f"{v}-{d}" for v, d, _ in SERIALIZED])
def test_every_variant_round_trips_through_config_and_keras_file(tmp_path, variant, depth, kwargs):
    model = build_resnet(depth, variant, input_shape=(32, 32, 3), num_classes=5, **kwargs)
    x = np.random.default_rng(5).random((2, 32, 32, 3), dtype=np.float32)
    model(x, training=True)  # move the BN statistics off their initial values
    expected = keras.ops.convert_to_numpy(model(x, training=False))

    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone(x, training=False)), expected)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), expected)
    assert len(loaded.losses) == len(model.losses)


def _strides(model: keras.Model, name: str) -> int:
    return model.get_layer(name).strides[0]


def test_stride_placement_of_v1_v1_5_and_keras_v2():
    v15 = build_resnet(50, "v1", input_shape=(64, 64, 3))
    assert (_strides(v15, "conv3_block1_1_conv"), _strides(v15, "conv3_block1_2_conv")) == (1, 2)
    assert "conv3_block1_2_pad" in {l.name for l in v15.layers}, "a strided 3x3 pads on both sides"
    v1 = build_resnet(50, "v1", input_shape=(64, 64, 3), stride_in_1x1=True)
    assert (_strides(v1, "conv3_block1_1_conv"), _strides(v1, "conv3_block1_2_conv")) == (2, 1)

    spec = SPECS["v2"][50]
    assert block_strides(spec) == [[1, 1, 1], [2, 1, 1, 1], [2] + [1] * 5, [2, 1, 1]]
    assert block_strides(spec, stride_last=True) == [[1, 1, 2], [1, 1, 1, 2], [1] * 5 + [2], [1, 1, 1]]
    v2 = build_resnet(50, "v2", input_shape=(64, 64, 3), v2_stride_last=True)
    assert _strides(v2, "conv2_block3_2_conv") == 2 and _strides(v2, "conv5_block1_0_conv") == 1
    assert tuple(v2.get_layer("conv2_block3_out").output.shape) == (None, 8, 8, 256)
    assert tuple(v2.get_layer("conv5_block3_out").output.shape) == (None, 2, 2, 2048)
    assert "conv2_block3_0_pool" in {l.name for l in v2.layers}, "a strided identity subsamples"
    for name in ("conv2_block1_preact_bn", "conv2_block1_out", "post_bn", "post_relu"):
        assert name in {l.name for l in v2.layers}, name


def _conv_biases(model: keras.Model) -> dict[str, bool]:
    return {l.name: l.use_bias for l in model.layers if isinstance(l, keras.layers.Conv2D)}


def test_use_bias_follows_the_layout_or_the_argument():
    assert not any(_conv_biases(build_resnet(50, "v1", input_shape=(64, 64, 3))).values())
    assert all(_conv_biases(build_resnet(50, "v1", input_shape=(64, 64, 3), use_bias=True)).values())
    assert not any(_conv_biases(build_resnet(18, "v2", input_shape=(64, 64, 3))).values())
    # keras.applications ResNetV2: a bias wherever no BN follows the convolution directly
    keras_v2 = _conv_biases(build_resnet(50, "v2", input_shape=(64, 64, 3), v2_stride_last=True))
    for name, bias in keras_v2.items():
        assert bias == (name == "conv1_conv" or name.endswith(("_0_conv", "_3_conv"))), name
    assert not any(
        _conv_biases(build_resnet(50, "v2", input_shape=(64, 64, 3), v2_stride_last=True, use_bias=False)).values()
    )


ZERO_INIT = [("cifar", 20, "_2_bn"), ("v1", 50, "_3_bn"), ("v2", 18, "_1_bn"), ("v2", 50, "_2_bn")]


@pytest.mark.parametrize("variant, depth, last_bn", ZERO_INIT, ids=[f"{v}-{d}" for v, d, _ in ZERO_INIT])
def test_zero_init_residual_starts_every_block_as_its_shortcut(variant, depth, last_bn):
    model = build_resnet(depth, variant, input_shape=(32, 32, 3), zero_init_residual=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = keras.ops.convert_to_numpy(layer.gamma)
            zero = "_block" in layer.name and layer.name.endswith(last_bn)
            assert (not gamma.any()) if zero else (gamma == 1).all(), layer.name
    # an identity block passes its input through unchanged (v1: through the final ReLU)
    probe = keras.Model(
        model.input, [model.get_layer("conv2_block1_out").output, model.get_layer("conv2_block2_out").output]
    )
    x = np.random.default_rng(6).random((1, 32, 32, 3), dtype=np.float32)
    first, second = (keras.ops.convert_to_numpy(t) for t in probe(x, training=False))
    np.testing.assert_allclose(second, first if variant == "v2" else np.maximum(first, 0), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, output_shape",
    [
        (dict(include_top=False, pooling=None), (None, 2, 3, 2048)),
        (dict(include_top=False, pooling="avg"), (None, 2048)),
        (dict(include_top=False, pooling="max"), (None, 2048)),
        (dict(pooling="max", num_classes=7), (None, 7)),
    ],
    ids=["features", "avg", "max", "top-on-max"],
)
def test_heads_and_any_input_shape_and_channel_count(kwargs, output_shape):
    model = build_resnet(50, "v2", input_shape=(40, 72, 1), **kwargs)  # grayscale, not square
    assert tuple(model.output_shape) == output_shape
    y = model(np.zeros((2, 40, 72, 1), np.float32), training=False)
    assert tuple(y.shape) == (2, *output_shape[1:])
    layers = {l.name for l in model.layers}
    assert ("logits" in layers) == kwargs.get("include_top", True)


def test_fully_convolutional_input_of_unknown_size():
    model = build_resnet(18, "v1", input_shape=(None, None, 3), num_classes=4)
    assert tuple(model(np.zeros((1, 37, 50, 3), np.float32)).shape) == (1, 4)
    with pytest.raises(ValueError, match="conv1_conv"):
        multiply_adds(model)


def test_multiply_adds_count_convolutions_and_dense_layers():
    inputs = keras.Input((10, 10, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", groups=2)(inputs)  # 10*10 * 3*3 * 4/2 * 8
    x = keras.layers.Conv2D(6, 1, strides=2, use_bias=False)(x)  # 5*5 * 8 * 6
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])  # 6 * 5, nested
    model = keras.Model(inputs, inner(x))
    assert multiply_adds(model) == 10 * 10 * 3 * 3 * 2 * 8 + 5 * 5 * 8 * 6 + 6 * 5


def test_train_config_takes_the_v2_table():
    cfg = from_dict({"train": {"variant": "v2", "depth": 200, "image_size": 64}})
    assert (cfg.train.variant, cfg.train.depth) == ("v2", 200)
    with pytest.raises(ConfigError, match=r"train\.depth: received 20 for variant 'v2'.*200"):
        from_dict({"train": {"variant": "v2", "depth": 20}})


# --- params.yaml's model options reach the builder ------------------------------------------


def test_train_params_choose_the_builder_options():
    cfg = from_dict(
        {
            "train": {
                "variant": "v1.5",
                "depth": 50,
                "image_size": 64,
                "use_bias": True,
                "zero_init_residual": True,
                "bn_momentum": 0.99,
                "bn_epsilon": 1.001e-5,
            }
        }
    )
    model = build_resnet(**model_arguments(cfg.train, num_classes=7))
    first, middle = model.get_layer("conv3_block1_1_conv"), model.get_layer("conv3_block1_2_conv")
    assert (first.strides, middle.strides) == ((1, 1), (2, 2)) and first.use_bias  # v1.5: the 3x3 strides
    bn = model.get_layer("conv2_block1_3_bn")
    assert (bn.momentum, bn.epsilon) == (0.99, 1.001e-5)
    assert np.all(keras.ops.convert_to_numpy(bn.gamma) == 0)
    assert model.output.shape[-1] == 7


@pytest.mark.parametrize(
    "train, fragment",
    [
        ({"variant": "v1", "depth": 50, "shortcut": "A"}, r"train\.shortcut: received 'A' for ResNet-50"),
        ({"variant": "cifar", "depth": 20, "stride_in_1x1": True}, r"train\.stride_in_1x1: received True"),
        (
            {"variant": "v1", "depth": 18, "v2_stride_last": True},
            r"train\.v2_stride_last: received True for variant 'v1'",
        ),
        ({"use_bias": "yes"}, r"train\.use_bias: expected true, false or null, received 'yes'"),
        ({"bn_momentum": 1.0}, r"train\.bn_momentum: received 1\.0; allowed: >= 0\.0 and < 1\.0"),
        ({"bn_epsilon": 0}, r"train\.bn_epsilon: received 0\.0; allowed: > 0\.0"),
        ({"shortcut": "C"}, r"train\.shortcut: received 'C'; allowed: 'auto', 'A', 'B'"),
    ],
)
def test_impossible_model_options_in_params_are_refused(train, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict({"train": train})
