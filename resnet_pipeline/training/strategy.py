"""The tf.distribute strategy of a run, created before anything else touches TensorFlow.

- `auto`: MirroredStrategy over the local GPUs when there are several, else one device (the GPU
  if there is one, else the CPU).
- `one_device`: the first GPU, else the CPU.
- `mirrored`: MirroredStrategy over the local GPUs, or over `train.cpu_devices` logical CPU devices
  when there is no GPU (two make it run with two replicas on a laptop or in CI).
- `multi_worker`: MultiWorkerMirroredStrategy, the cluster from `TF_CONFIG`. Only the chief
  (worker 0, or the `chief` task) writes checkpoints, summaries and the final model; the others
  write theirs to a scratch folder that is removed. TensorFlow's gRPC server listens on every
  interface whatever host `TF_CONFIG` names: a `TF_CONFIG` of loopback addresses on a machine with
  other interfaces gets a warning (`train --workers N` runs its workers where only loopback is).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from dataclasses import dataclass

import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-worker cluster (one worker, the chief, otherwise)."""

    task_type: str = "worker"
    task_index: int = 0
    workers: int = 1

    @property
    def is_chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0)

    @property
    def name(self) -> str:
        return f"{self.task_type}{self.task_index}"


def read_tf_config(environ: dict | None = None) -> Cluster | None:
    """The cluster of `TF_CONFIG`, or None when it is unset; a malformed one raises ValueError naming it."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG")
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, task_index = task["type"], int(task["index"])
        members = {name: list(addresses) for name, addresses in cluster.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"TF_CONFIG: expected JSON with 'cluster' and 'task': {{'type', 'index'}} ({err})") from None
    if task_type not in members or not 0 <= task_index < len(members[task_type]):
        raise ValueError(f"TF_CONFIG: task {task_type}:{task_index} is not in the cluster {members}")
    workers = len(members.get("worker", [])) + len(members.get("chief", []))
    return Cluster(task_type, task_index, workers)


def exposed_interfaces(environ: dict | None = None) -> list[str]:
    """The interfaces besides loopback that a worker's gRPC server will listen on although every
    address of `TF_CONFIG` is a loopback one (so its user thinks it local); [] otherwise."""
    try:
        cluster = json.loads((environ if environ is not None else os.environ).get("TF_CONFIG") or "{}")["cluster"]
        hosts = [address.rsplit(":", 1)[0].strip("[]") for task in cluster.values() for address in task]
        if not hosts or not all(host == "localhost" or ipaddress.ip_address(host).is_loopback for host in hosts):
            return []
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    return [name for _, name in socket.if_nameindex() if name != "lo"]


def split_cpu(devices: int) -> None:
    """Split the CPU into `devices` logical devices (before TensorFlow initialises its runtime)."""
    if devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == devices:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as err:
        raise RuntimeError(
            f"train.cpu_devices: cannot split the CPU into {devices} devices once "
            f"TensorFlow has started ({err}); create the strategy first"
        ) from None


def make_strategy(name: str, cpu_devices: int = 1) -> tuple[tf.distribute.Strategy, Cluster]:
    """The strategy named by `train.strategy`, and this process's place in the cluster."""
    cluster = read_tf_config()
    if name == "multi_worker":
        if cluster is None:
            raise ValueError(
                "train.strategy: 'multi_worker' needs TF_CONFIG (the cluster and this task); "
                "set it, or run `resnet-pipeline train --workers N` to try it on one machine"
            )
        if exposed := exposed_interfaces():
            log.warning(
                "TF_CONFIG names loopback addresses only, but TensorFlow's gRPC server listens on every "
                "interface (%s too): whoever reaches its port can run operations in this worker. "
                "`resnet-pipeline train --workers N` runs local workers where only loopback is",
                ", ".join(exposed),
            )
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            split_cpu(cpu_devices)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info(
            "strategy: MultiWorkerMirroredStrategy, %s of %d workers, %d replicas",
            cluster.name,
            cluster.workers,
            strategy.num_replicas_in_sync,
        )
        return strategy, cluster
    gpus = tf.config.list_physical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        if gpus:
            strategy = tf.distribute.MirroredStrategy()
        else:
            split_cpu(cpu_devices)
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices)
        log.info("strategy: MirroredStrategy over %s", ", ".join(strategy.extended.worker_devices))
        return strategy, Cluster()
    device = "/gpu:0" if gpus else "/cpu:0"
    log.info("strategy: one device, %s", device)
    return tf.distribute.OneDeviceStrategy(device), Cluster()
