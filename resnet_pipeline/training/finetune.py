"""Fine-tuning controls: which layers train, and when.

- `train.freeze_bn`: every BatchNormalization is frozen (`trainable=False`: Keras then runs it in
  inference mode, so its moving statistics, gamma and beta stay as loaded).
- `train.trainable_from: convN`: the stem (`conv1`, `pool1`) and the stages before `convN` are
  frozen, their BN layers in inference mode; `logits` freezes everything but the classifier.
- `train.head_epochs: N`: the first N epochs train only the classifier (`logits`), then the layers
  the two options above leave trainable. The phase is a function of the epoch, so a resumed run
  lands in the phase it was killed in.
- `train.head_lr_multiplier`: the classifier's gradients are multiplied by it before the update,
  which with SGD (momentum included) is the same as multiplying its learning rate.

The trainer builds its optimizer over the layers trainable after the head phase (`FineTune`
sets them when created), and traces its step again when `enter` reports a change of phase.
"""

from __future__ import annotations

import logging
import re

import keras
import numpy as np

from resnet_pipeline.config import TrainConfig

log = logging.getLogger(__name__)

HEAD = "logits"
_LAST = 99  # the stage number of what follows the last stage (post_bn, pooling, logits)


def stage_of(layer_name: str) -> int:
    """1 for the stem, N for the layers of stage convN, _LAST after the last stage."""
    if layer_name.startswith(("conv1_", "pool1_")):
        return 1
    m = re.match(r"conv(\d+)_block", layer_name)
    return int(m.group(1)) if m else _LAST


class FineTune:
    """The trainable flags of `model`'s layers under `cfg`, phase by phase."""

    def __init__(self, model: keras.Model, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.first_trained = (
            _LAST if cfg.trainable_from == HEAD else (int(cfg.trainable_from[4:]) if cfg.trainable_from else 1)
        )
        self.phase: str | None = None
        self._set("all")  # the optimizer is built over these
        head = model.get_layer(HEAD) if HEAD in [layer.name for layer in model.layers] else None
        self.head_ids = {id(v) for v in head.weights} if head is not None else set()

    def trains(self, layer: keras.layers.Layer, phase: str) -> bool:
        """Whether `layer` trains in `phase` ("head" or "all")."""
        if phase == "head":
            return layer.name == HEAD
        if self.cfg.freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            return False
        return stage_of(layer.name) >= self.first_trained

    @property
    def active(self) -> bool:
        """Whether any fine-tuning control is set (a plain training logs nothing of phases)."""
        c = self.cfg
        return bool(c.freeze_bn or c.trainable_from or c.head_epochs or c.head_lr_multiplier != 1 or c.init)

    def phase_of(self, epoch: int) -> str:
        return "head" if epoch < self.cfg.head_epochs else "all"

    def _set(self, phase: str) -> bool:
        if phase == self.phase:
            return False
        for layer in self.model.layers:
            if layer.weights:
                layer.trainable = self.trains(layer, phase)
        self.phase = phase
        return True

    def enter(self, epoch: int) -> bool:
        """Set the flags of `epoch`'s phase; True if they changed (the train step must be traced again)."""
        changed = self._set(self.phase_of(epoch))
        if (changed or epoch == 0) and self.active:
            trained = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
            log.info(
                "fine-tune: epoch %d in the %s phase; %d trainable weights (%d layers frozen)",
                epoch + 1,
                self.phase,
                trained,
                sum(1 for layer in self.model.layers if layer.weights and not layer.trainable),
            )
        return changed

    def scale(self, grads: list, variables: list) -> list:
        """The gradients with the classifier's multiplied by `head_lr_multiplier`."""
        k = self.cfg.head_lr_multiplier
        if k == 1.0:
            return grads
        return [g * k if id(v) in self.head_ids and g is not None else g for g, v in zip(grads, variables)]

    def describe(self) -> dict:
        """The settings, for the model's record."""
        frozen = [layer.name for layer in self.model.layers if layer.weights and not self.trains(layer, "all")]
        return {
            "freeze_bn": self.cfg.freeze_bn,
            "trainable_from": self.cfg.trainable_from,
            "head_epochs": self.cfg.head_epochs,
            "head_lr_multiplier": self.cfg.head_lr_multiplier,
            "frozen_layers": len(frozen),
        }
