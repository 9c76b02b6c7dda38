"""SavedModel export for serving (TF Serving, `tf.saved_model.load`), with the evaluation preprocessing inside.

Signatures of the exported SavedModel:

- `serving_default`: `image_bytes`, a string tensor of shape [N] holding encoded images (JPEG, PNG,
  GIF or BMP), decoded and preprocessed exactly as the evaluate stage does (`eval_image`);
- `serving_images`: `images`, float32 [N, S, S, 3], images already preprocessed (normalised as
  the model's `train.preprocess`: caffe, tf or scale).

Both return `classes` (string [N, k], the top-k class names, best first), `probabilities`
(float32 [N, k], softmax) and `class_ids` (int32 [N, k]), with k = min(top_k, number of classes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf

from resnet_pipeline.data.pipeline import Preprocess, eval_image
from resnet_pipeline.fileio import staged_dir
from resnet_pipeline.models.resnet import recursion_limit

log = logging.getLogger(__name__)

SIGNATURE_BYTES = "serving_default"
SIGNATURE_IMAGES = "serving_images"


class ServingModule(tf.Module):
    """The Keras model with the class names, the preprocessing and a top-k softmax head."""

    def __init__(self, model: keras.Model, classes: list[str], prep: Preprocess, top_k: int):
        super().__init__(name="resnet_serving")
        # Not a tracked attribute: the SavedModel keeps the tf.Variables the signatures capture
        # (`captured_variables`, set by export_saved_model), not a second copy of the Keras model's.
        object.__setattr__(self, "model", model)
        self.class_names = tf.constant(list(classes), tf.string)
        self.k = min(top_k, len(classes))
        self.prep = prep
        size = prep.image_size
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
        )
        self.serve_images = tf.function(
            self._serve_images, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")]
        )

    def _top_k(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        classes = self.class_names.shape[0]
        logits = tf.cond(  # an empty batch skips the model (its convolutions reject zero images)
            tf.shape(images)[0] > 0,
            lambda: tf.cast(self.model(images, training=False), tf.float32),
            lambda: tf.zeros([0, classes], tf.float32),
        )
        probabilities, ids = tf.math.top_k(tf.nn.softmax(logits, axis=-1), k=self.k)
        return {
            "classes": tf.gather(self.class_names, ids),
            "probabilities": probabilities,
            "class_ids": tf.cast(ids, tf.int32),
        }

    def _serve_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        size = self.prep.image_size
        images = tf.map_fn(
            lambda encoded: eval_image(encoded, self.prep),
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        return self._top_k(images)

    def _serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._top_k(images)


def export_saved_model(
    model: keras.Model, classes: list[str], prep: Preprocess, dest: str | Path, top_k: int = 5
) -> Path:
    """Write a SavedModel of `model` to `dest` (replaced as a whole), ready for TF Serving; return `dest`."""
    dest = Path(dest)
    if top_k < 1:
        raise ValueError(f"top_k: received {top_k}; allowed: 1 or more")
    if int(model.input_shape[1]) != prep.image_size:
        raise ValueError(f"prep.image_size: received {prep.image_size}; the model takes {model.input_shape[1]}")
    module = ServingModule(model, classes, prep, top_k)
    with recursion_limit():  # tracing ResNet-1202 goes deeper than Python's default limit
        signatures = {
            SIGNATURE_BYTES: module.serve_bytes.get_concrete_function(),
            SIGNATURE_IMAGES: module.serve_images.get_concrete_function(),
        }
        # Track the tf.Variables the signatures capture, as keras.export.ExportArchive does: with only the
        # Keras model tracked, TF1-style loaders (TF Serving, `saved_model_cli run`) restore other copies
        # and the graph reads uninitialised variables (keras-team/keras#20095).
        module.captured_variables = list({id(v): v for fn in signatures.values() for v in fn.variables}.values())
        with staged_dir(dest) as tmp:
            tf.saved_model.save(module, str(tmp), signatures=signatures)
    log.info("export: SavedModel with signatures %s in %s", ", ".join(signatures), dest)
    return dest
