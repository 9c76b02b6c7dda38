"""Where each stage reads and writes, derived from `base.data_dir` and `base.artifacts_dir`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet_pipeline.config import Config


@dataclass(frozen=True)
class Paths:
    root: Path
    data: Path
    artifacts: Path

    @classmethod
    def from_config(cls, cfg: Config, root: str | Path = ".") -> Paths:
        root = Path(root)
        return cls(root, root / cfg.base.data_dir, root / cfg.base.artifacts_dir)

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def downloads(self) -> Path:
        """Fetched archives (and partial ones, for resuming); not a DVC output."""
        return self.data / "downloads"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.parquet"

    @property
    def labels(self) -> Path:
        return self.data / "labels.json"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    @property
    def model_dir(self) -> Path:
        return self.artifacts / "model"

    @property
    def checkpoints(self) -> Path:
        return self.artifacts / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard logs of the train stage, a folder per run; not a DVC output."""
        return self.artifacts / "tensorboard"

    @property
    def eval_dir(self) -> Path:
        return self.artifacts / "eval"

    @property
    def registered(self) -> Path:
        return self.artifacts / "registered.json"
