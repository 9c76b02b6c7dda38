"""How a training run that was asked to stop says so (no TensorFlow here: the CLI and the flow
catch it without importing the trainer)."""

from __future__ import annotations

PREEMPTED_EXIT = 143  # 128 + SIGTERM: stopped on request, with a checkpoint to resume from


class Preempted(RuntimeError):
    """SIGTERM arrived: the run saved a checkpoint at `step` and stopped; rerun it to resume."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint}; rerun to resume")
        self.step, self.checkpoint = step, checkpoint

    def __reduce__(self):
        return Preempted, (self.step, self.checkpoint)
