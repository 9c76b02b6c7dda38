"""ResNets of He et al. (2015) built from the depth table: sizes, names, errors, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from resnet_pipeline.models.resnet import SPECS, ZeroPadShortcut, allowed_depths, build_resnet


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


# torchvision.models.resnet18/34/50(): sum(p.numel() for p in m.parameters())
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_v1_resnet_matches_torchvision_parameter_count(depth):
    # torchvision (like the paper's ImageNet models from Table 3 on) projects the shortcut (option B)
    model = build_resnet(depth, "v1", input_shape=(224, 224, 3), num_classes=1000)  # the v1 default is the projection shortcut, as torchvision
    assert trainable_params(model) == TORCHVISION_PARAMS[depth]
    assert tuple(model.output_shape) == (None, 1000)


def test_bottleneck_always_projects_its_first_shortcut():
    a = build_resnet(50, "v1", input_shape=(64, 64, 3), num_classes=10, shortcut="A")
    b = build_resnet(50, "v1", input_shape=(64, 64, 3), num_classes=10, shortcut="B")
    assert trainable_params(a) == trainable_params(b)


def test_v1_forward_on_small_input():
    model = build_resnet(18, "v1", input_shape=(64, 64, 3), num_classes=5, shortcut="B")
    y = model(np.zeros((1, 64, 64, 3), np.float32), training=False)
    assert tuple(y.shape) == (1, 5)


def test_layer_names_follow_the_paper_stages():
    names = {layer.name for layer in build_resnet(20).layers}
    for name in ("conv1_conv", "conv1_bn", "conv1_relu", "conv2_block1_1_conv", "conv2_block1_2_bn",
                 "conv2_block3_out", "conv3_block1_0_pad", "conv4_block3_add", "avg_pool", "logits"):
        assert name in names, name
    assert "conv2_block4_1_conv" not in names and "conv5_block1_1_conv" not in names
    names50 = {layer.name for layer in build_resnet(50, "v1", input_shape=(64, 64, 3)).layers}
    for name in ("pool1_pool", "conv2_block1_0_conv", "conv2_block3_3_conv", "conv4_block6_3_bn",
                 "conv5_block3_out"):
        assert name in names50, name
    assert "conv4_block7_1_conv" not in names50


def test_allowed_depths_follow_the_table():
    assert allowed_depths("cifar") == (20, 32, 44, 56, 110)
    assert allowed_depths("v1") == (18, 34, 50, 101, 152)
    assert allowed_depths("nope") == ()
    assert set(SPECS) == {"cifar", "v1"}


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
    ],
    ids=["depth", "variant", "depth-of-other-variant", "cifar-input-too-small", "v1-input-too-small",
         "shortcut", "num_classes"],
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
        keras.ops.convert_to_numpy(model(x, training=False)), rtol=0, atol=1e-6,
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
