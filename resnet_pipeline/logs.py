"""Logging of a command: the pipeline's own lines, warnings and errors; framework INFO only with `-v`.

    setup(verbose=args.verbose)   # first thing in the CLI's main, before anything imports TensorFlow

Quiet (the default): TensorFlow's C++ INFO lines are off (`TF_CPP_MIN_LOG_LEVEL=1`, read when
TensorFlow loads, so it is set before; a value the user exported is kept), and records below
WARNING from the `absl` and `tensorflow` Python loggers (absl's per-checkpoint "Sharding callback
duration", the SavedModel export's list of renamed inputs, "Assets written to") are dropped.
Verbose: DEBUG for the pipeline and every framework line (`TF_CPP_MIN_LOG_LEVEL=0`).

TensorFlow's oneDNN start-up notice (`I... port.cc] oneDNN custom operations are on`) is written
by absl's C++ logging before TensorFlow reads `TF_CPP_MIN_LOG_LEVEL`, so it is not silenced:
`TF_ENABLE_ONEDNN_OPTS=0` would remove it by turning oneDNN off (other numerics and speed), and
redirecting the process's stderr around `import tensorflow` would also swallow what TensorFlow
prints before it aborts (a missing CPU instruction, a broken CUDA install).
"""

from __future__ import annotations

import logging
import os
import sys

FRAMEWORK_LOGGERS = ("absl", "tensorflow", "tf2onnx")  # tf2onnx: the ONNX export's converter
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _FrameworkInfo(logging.Filter):
    """Drop records below WARNING from the framework loggers (and their children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        framework = record.name.split(".", 1)[0] in FRAMEWORK_LOGGERS
        return not framework or record.levelno >= logging.WARNING


def setup(verbose: bool = False) -> None:
    """Configure logging to stderr for a command; quiet about the frameworks unless `verbose`."""
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, stream=sys.stderr)
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _FrameworkInfo) for f in handler.filters):
                handler.addFilter(_FrameworkInfo())
