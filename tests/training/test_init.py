"""train.init: keras.applications' weights files served over loopback HTTP, loaded by name and shape.

keras.applications models are built with weights=None (no network), their weights saved in the
ImageNet files' own format (Keras 2's .h5: `layer_names`, `weight_names`), served by
tests/httpserver.py with their sha256, and loaded through `train.init`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from resnet_pipeline.config import ConfigError, from_dict
from resnet_pipeline.models.resnet import build_resnet, model_arguments
from resnet_pipeline.training.init import InitError, imagenet_file, load_initial_weights
from tests.httpserver import LoopbackHTTPServer

pytestmark = pytest.mark.slow  # builds the six keras.applications models and loads their weights

SIZE, CLASSES = 64, 10
APPLICATIONS = [
    ("ResNet50", "v1", 50),
    ("ResNet101", "v1", 101),
    ("ResNet152", "v1", 152),
    ("ResNet50V2", "v2", 50),
    ("ResNet101V2", "v2", 101),
    ("ResNet152V2", "v2", 152),
]
LAYOUT = {
    "v1": {"use_bias": True, "bn_epsilon": 1.001e-5},  # v1 itself strides the 1x1
    "v2": {"v2_stride_last": True, "bn_epsilon": 1.001e-5},
}


def _legacy_h5(model: keras.Model, path: Path) -> bytes:
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path.read_bytes()


def _randomise(model: keras.Model, seed: int) -> None:
    """BN statistics and betas away from their initial 0/1, so that a BN left unloaded would show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.1, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 1.5, var.shape),
                ]
            )


def _with_other_head(data: bytes, path: Path, classes: int) -> bytes:
    """The same file with a classifier of another class count."""
    path.write_bytes(data)
    rng = np.random.default_rng(classes)
    with h5py.File(path, "r+") as f:
        group = f["predictions"]
        for name in ("predictions/kernel", "predictions/bias"):
            shape = group[name].shape[:-1] + (classes,)
            del group[name]
            group[name] = rng.normal(0, 0.01, shape).astype("float32")
    return path.read_bytes()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Each application built once with weights=None; its .h5, and the same with a 3-class head,
    served over loopback; yields ({application: (reference model, url, sha256, url of the other head,
    its sha256)}, server)."""
    folder = tmp_path_factory.mktemp("weights")
    files, models = {}, {}
    for i, (app, _, _) in enumerate(APPLICATIONS):
        keras.utils.set_random_seed(i)
        ref = getattr(keras.applications, app)(
            weights=None, input_shape=(SIZE, SIZE, 3), classes=CLASSES, classifier_activation=None
        )
        _randomise(ref, i)
        files[f"/{app}.h5"] = _legacy_h5(ref, folder / f"{app}.h5")
        files[f"/{app}-3.h5"] = _with_other_head(files[f"/{app}.h5"], folder / f"{app}-3.h5", 3)
        models[app] = ref
    with LoopbackHTTPServer(files) as server:

        def entry(path):
            return server.url(path), hashlib.sha256(files[path]).hexdigest()

        yield {app: (ref, *entry(f"/{app}.h5"), *entry(f"/{app}-3.h5")) for app, ref in models.items()}, server


def _cfg(variant: str, depth: int, **train):
    return from_dict(
        {"train": {"variant": variant, "depth": depth, "image_size": SIZE, **LAYOUT.get(variant, {}), **train}}
    ).train


def _ours(cfg, classes: int) -> keras.Model:
    return build_resnet(**model_arguments(cfg, num_classes=classes))


def _features(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return keras.Model(model.input, model.get_layer("avg_pool").output)(x, training=False).numpy()


@pytest.mark.parametrize("app,variant,depth", APPLICATIONS, ids=[a for a, _, _ in APPLICATIONS])
def test_keras_applications_weights_load_by_name_with_the_same_outputs(served, tmp_path, app, variant, depth):
    """One build of ours per depth: first a file of another class count (the head stays new, the
    rest equals keras.applications'), then the file of its class count (every output equal)."""
    models, _ = served
    ref, url, digest, other_url, other_digest = models[app]
    x = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype("float32")
    ours = _ours(_cfg(variant, depth), CLASSES)
    fresh = [w.numpy() for w in ours.get_layer("logits").weights]

    cfg = _cfg(variant, depth, init=other_url, init_sha256=other_digest)
    record = load_initial_weights(ours, cfg, cache_dir=tmp_path)
    assert record["reinitialised"] == ["logits"] and record["skipped"] == ["logits"]
    for before, after in zip(fresh, ours.get_layer("logits").weights):
        np.testing.assert_array_equal(before, after.numpy())
    np.testing.assert_allclose(_features(ours, x), _features(ref, x), atol=1e-5, rtol=1e-5)

    cfg = _cfg(variant, depth, init=url, init_sha256=digest)
    record = load_initial_weights(ours, cfg, cache_dir=tmp_path)
    np.testing.assert_allclose(ours(x, training=False).numpy(), ref(x, training=False).numpy(), atol=1e-5, rtol=1e-5)
    assert record["reinitialised"] == [] and record["skipped"] == [] and record["sha256"] == digest
    assert record["source"] == url and "logits" in record["loaded"] and "conv1_conv" in record["loaded"]


@pytest.fixture(scope="module")
def resnet50():
    """Our ResNet-50 in keras.applications' layout, shared by the tests whose loads are refused
    (a refused file changes no weight: test_a_checksum_mismatch_is_refused_and_nothing_cached)."""
    return _ours(_cfg("v1", 50), CLASSES)


def test_a_file_of_another_depth_is_refused_naming_the_file_and_layer(served, resnet50, tmp_path):
    models, _ = served
    _, url, digest, *_ = models["ResNet101"]
    cfg = _cfg("v1", 50, init=url, init_sha256=digest)
    with pytest.raises(
        InitError,
        match=r"ResNet101\.h5: layer conv4_block7_1_conv of the file is not in the model "
        r"ResNet-50 \(v1\).*ResNet-101.*set train.depth: 101",
    ):
        load_initial_weights(resnet50, cfg, cache_dir=tmp_path)
    missing = tmp_path / "missing.h5"  # a file without one of the model's layers
    missing.write_bytes(served[1].files["/ResNet50.h5"])
    with h5py.File(missing, "r+") as f:
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != "conv3_block2_2_bn"]
    cfg = _cfg("v1", 50, init=str(missing))
    with pytest.raises(InitError, match=r"missing\.h5: layer conv3_block2_2_bn of the model is not in the file"):
        load_initial_weights(resnet50, cfg, cache_dir=tmp_path)


def test_a_layout_without_the_files_biases_is_refused_naming_the_option(served, tmp_path):
    models, _ = served
    _, url, digest, *_ = models["ResNet50"]
    cfg = _cfg("v1", 50, init=url, init_sha256=digest, use_bias=False)
    with pytest.raises(InitError, match=r"ResNet50\.h5: layer conv1_conv: the file has 2 weights.*train.use_bias"):
        load_initial_weights(_ours(cfg, CLASSES), cfg, cache_dir=tmp_path)


def test_a_checksum_mismatch_is_refused_and_nothing_cached(served, resnet50, tmp_path):
    models, _ = served
    _, url, *_ = models["ResNet50"]
    cfg = _cfg("v1", 50, init=url, init_sha256="0" * 64)
    model = resnet50
    before = [w.numpy() for w in model.weights]
    with pytest.raises(InitError, match=r"ResNet50\.h5: sha256 mismatch: expected 0{64}"):
        load_initial_weights(model, cfg, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.h5"))
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def test_a_truncated_file_is_refused_naming_it(served, resnet50, tmp_path):
    models, server = served
    data = server.files["/ResNet50.h5"]
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    cfg = _cfg("v1", 50, init=str(cut))
    with pytest.raises(InitError, match=r"cut\.h5: .*(truncated|corrupt)"):
        load_initial_weights(resnet50, cfg, cache_dir=tmp_path)


def test_imagenet_from_a_mirror_checks_the_official_md5(served, resnet50, tmp_path):
    """A mirror (train.init_url) serving a file that is not keras.applications' is refused by its md5."""
    models, server = served
    file, official, md5 = imagenet_file("v1", 50)
    assert official == "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + file
    assert file == "resnet50_weights_tf_dim_ordering_tf_kernels.h5" and md5 == "2cb95161c43110f7111970584f804107"
    assert imagenet_file("v2", 152, include_top=False)[0] == "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    server.files[f"/mirror/{file}"] = server.files["/ResNet50.h5"]
    cfg = from_dict(
        {
            "train": {
                "init": "imagenet",
                "variant": "v1",
                "depth": 50,
                "image_size": SIZE,
                "init_url": server.url("/mirror/"),
            }
        }
    ).train
    layout = (model_arguments(cfg, num_classes=CLASSES)["stride_in_1x1"], cfg.use_bias, cfg.bn_epsilon)
    assert (*layout, cfg.bn_momentum) == (True, True, 1.001e-5, 0.99)
    with pytest.raises(InitError, match=rf"mirror/{file}: md5 mismatch: expected {md5}"):
        load_initial_weights(resnet50, cfg, cache_dir=tmp_path)


def test_keras3_weights_h5_and_keras_files_load(served, tmp_path):
    models, _ = served
    ref, *_ = models["ResNet50V2"]
    ref.save_weights(tmp_path / "ref.weights.h5")
    ref.save(tmp_path / "ref.keras")
    x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype("float32")
    model = _ours(_cfg("v2", 50), CLASSES)
    for name in ("ref.weights.h5", "ref.keras"):
        for w in model.weights:  # nothing left from the load before
            w.assign(np.zeros(w.shape, w.dtype))
        cfg = _cfg("v2", 50, init=str(tmp_path / name))
        record = load_initial_weights(model, cfg, cache_dir=tmp_path)
        assert record["reinitialised"] == []
        np.testing.assert_allclose(model(x, training=False).numpy(), ref(x, training=False).numpy(), atol=1e-5)


def test_a_keras_file_of_another_stride_layout_is_refused(served, tmp_path):
    """Strides are not in the weights: a .keras file's config shows them."""
    models, _ = served
    ref, *_ = models["ResNet50"]
    ref.save(tmp_path / "ref.keras")
    cfg = _cfg("v1.5", 50, init=str(tmp_path / "ref.keras"), use_bias=True, bn_epsilon=1.001e-5)
    with pytest.raises(
        InitError, match=r"ref\.keras: layer conv3_block1_1_conv: strides .* train.variant \('v1' strides the 1x1"
    ):
        load_initial_weights(_ours(cfg, CLASSES), cfg, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "train,message",
    [
        (
            {"init": "imagenet", "variant": "v1.5", "depth": 50},
            "train.variant: received 'v1.5'; init imagenet needs 'v1' or 'v2' (keras.applications "
            "ResNet50/101/152, which stride the 1x1,",
        ),
        (
            {"init": "imagenet", "variant": "v1", "depth": 50, "use_bias": False},
            "train.use_bias: received False; the ImageNet weights of ResNet-50 (v1) need True",
        ),
        ({"init": "imagenet", "variant": "v2", "depth": 50, "bn_epsilon": 1e-3}, "train.bn_epsilon: received 0.001"),
        ({"init": "imagenet", "variant": "v1", "depth": 34}, "train.depth: received 34; init imagenet has weights for"),
        ({"init": "imagenet"}, "train.variant: received 'cifar'; init imagenet needs 'v1' or 'v2'"),
        ({"init": "https://example.com/w.h5"}, "train.init_sha256: required"),
        ({"init": "resnet-digits@champion", "init_url": "http://m/"}, "train.init_url: received 'http://m/'"),
        ({"init": "Not A Spec"}, "train.init: model spec 'Not A Spec'"),
        ({"init": "imagenet", "variant": "v1", "depth": 50, "mean": [0.5, 0.5, 0.5]}, "train.mean: received"),
    ],
)
def test_init_params_are_checked_naming_the_key(train, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"train": train})
    assert message in str(err.value)


@pytest.mark.parametrize("mode,module", [("caffe", "resnet"), ("tf", "resnet_v2")])
def test_preprocess_modes_are_keras_applications_own(mode, module):
    """train.preprocess caffe / tf normalise as keras.applications' preprocess_input; auto follows imagenet."""
    import tensorflow as tf

    from resnet_pipeline.data.pipeline import Preprocess, eval_image

    pixels = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ours = eval_image(tf.io.encode_png(pixels), Preprocess(8, mode=mode)).numpy()
    expected = getattr(keras.applications, module).preprocess_input(pixels.astype("float32")[None])[0]
    np.testing.assert_allclose(ours, np.asarray(expected), atol=1e-4)
    variant = "v1" if mode == "caffe" else "v2"
    cfg = from_dict({"train": {"init": "imagenet", "variant": variant, "depth": 50, "image_size": 64}}).train
    assert Preprocess.from_train(cfg).mode == mode
    assert Preprocess.from_train(dataclasses.replace(cfg, preprocess="scale")).mode == "scale"


@pytest.mark.parametrize(
    "old_stride, ours, refused", [(False, "v1.5", False), (False, "v1", True), (True, "v1", False)]
)
def test_a_version_registered_by_0_1_is_checked_in_todays_spelling(old_stride, ours, refused):
    """0.1 registered `variant: v1` with `stride_in_1x1`: its v1 + false is today's v1.5."""
    from resnet_pipeline.training.init import check_layout

    cfg = from_dict({"train": {"variant": ours, "depth": 50, "image_size": SIZE}}).train
    params = {**cfg.__dict__, "variant": "v1", "stride_in_1x1": old_stride}
    if not refused:
        check_layout(cfg, params, "resnet-old:1")
        return
    with pytest.raises(InitError, match=r"train\.variant: received 'v1'; the weights of resnet-old:1 need 'v1\.5'"):
        check_layout(cfg, params, "resnet-old:1")
