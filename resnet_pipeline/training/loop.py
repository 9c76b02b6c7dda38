"""Train stage: a custom training loop over tf.distribute that survives being killed.

    resnet-pipeline train [--set train.strategy=mirrored] [--workers N]

As Model Garden's `resnet_ctl_imagenet_main`: the strategy is created first, the model and
optimizer are built inside `strategy.scope()`, the data comes from
`strategy.distribute_datasets_from_function` with a per-replica batch of
`global_batch_size / replicas`, the step is a `tf.function` around `strategy.run`, the loss is
averaged over the global batch and weight decay is scaled by the number of replicas. `model.fit`
is not used (it fails under MultiWorkerMirroredStrategy with Keras 3, keras-team/keras#20585).

State (model, optimizer, step, the epoch's running sums) is saved with
`tf.train.CheckpointManager` every `checkpoint_every_steps` steps, at the end of fine-tuning's
head phase and after the last step, in a
folder keyed by the run's fingerprint (the params that change the result, the seed and the data).
A rerun resumes from the last checkpoint: the lr schedule follows the restored step, the epoch's
data order is replayed and the batches already trained are skipped, so no step is trained twice
or skipped. SIGTERM (how preemption arrives) is noted, agreed on by all workers within the step,
and answered by a checkpoint at that step and `Preempted`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from resnet_pipeline.config import Config, TrainConfig
from resnet_pipeline.training.preempt import Preempted  # noqa: F401  (raised here, caught by callers)
from resnet_pipeline.training.run import Run, WorkerFailed, run_fingerprint, trained_on  # noqa: F401 (the API)
from resnet_pipeline.training.strategy import Cluster


def train(
    cfg: TrainConfig,
    full_config: Config,
    shards_dir: str | Path,
    labels_path: str | Path,
    model_dir: str | Path,
    checkpoint_root: str | Path,
    *,
    tensorboard_root: str | Path | None = None,
    strategy: tf.distribute.Strategy | None = None,
    cluster: Cluster | None = None,
    fetch_init: Callable[[str], Path] | None = None,
    saved_model: bool = True,
) -> dict:
    """Train on the train shards, validate on val every `validate_every_epochs`, write `model_dir`;
    return the summary.

    Creates the strategy of `cfg.strategy` unless one is given (with its `cluster`); raises
    `Preempted` after saving when SIGTERM arrives, `WorkerFailed` when another worker dies.
    `fetch_init(spec)` fetches a `train.init` registry spec's model folder (the stage passes
    `stages.init_fetcher`: training knows no registry). `saved_model=False` leaves
    the SavedModel out of `model_dir` (model.keras and the records only), for a caller that does not
    serve the model with TF Serving; the train stage always writes it.
    """
    run = Run(cfg, full_config, Path(shards_dir), Path(labels_path), strategy, cluster, fetch_init)
    run.restore(Path(checkpoint_root), tensorboard_root)
    run.train()
    summary = run.summary()
    if run.cluster.is_chief:
        run.export(Path(model_dir), summary, saved_model)
    return summary
