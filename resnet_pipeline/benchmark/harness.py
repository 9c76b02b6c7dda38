"""What the benchmarks share: a work folder, alternating timed rounds and a row of step figures.

Timing in alternating rounds means that a slow spell of a shared machine falls on every side of a
comparison, not on one. Imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


@contextlib.contextmanager
def work_folder(work_dir: str | Path | None, prefix: str) -> Iterator[Path]:
    """`work_dir` as given (kept afterwards), or a new temporary folder, removed at the end."""
    if work_dir is not None:
        yield Path(work_dir)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Timing(NamedTuple):
    """How a step is timed: its batch and input side, the timed steps (spread over `rounds` rounds
    that take the compared sides in turn) and the untimed warm-up steps before them."""

    batch_size: int
    image_size: int
    steps: int
    warmup: int
    rounds: int


def timed_rounds(sides: Mapping[str, Callable[[], object]], timing: Timing, what: str) -> dict[str, list[float]]:
    """Seconds of each of `timing.steps` calls of every side's step, after `timing.warmup` untimed
    calls of each, in `timing.rounds` alternating rounds."""
    for label, step in sides.items():
        log.info("benchmark: %s, warm-up (%d steps)", label, timing.warmup)
        for _ in range(timing.warmup):
            step()
    durations: dict[str, list[float]] = {label: [] for label in sides}
    count, rounds = timing.steps, timing.rounds
    per_round = [count // rounds + (r < count % rounds) for r in range(rounds)]
    for r, n in enumerate(per_round, start=1):
        for label, step in sides.items():
            for _ in range(n):
                start = time.perf_counter()
                step()
                durations[label].append(time.perf_counter() - start)
        log.info("benchmark: %s round %d/%d done", what, r, rounds)
    return durations


def step_row(durations: list[float], model: str, phase: str, depth: int, variant: str, timing: Timing) -> dict:
    """The figures of one model and phase: mean and standard deviation of a step, images per second."""
    mean = statistics.fmean(durations)
    return {
        "model": model,
        "depth": depth,
        "variant": variant,
        "phase": phase,
        "batch_size": timing.batch_size,
        "image_size": timing.image_size,
        "steps": len(durations),
        "mean_sec": mean,
        "std_sec": statistics.stdev(durations) if len(durations) > 1 else 0.0,
        "images_per_sec": timing.batch_size / mean,
    }
