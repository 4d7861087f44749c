"""Entry point: ``python -m labram_jax.main --config=configs/<size>.py:<stage> --workdir=DIR``.

Fields are overridden with ``--config.optim.lr=1e-4`` etc. Multi-process runs call
``jax.distributed.initialize()`` here only: automatically on TPU pods and Slurm, or
with --coordinator/--num_processes/--process_id (e.g. several CPU processes on one host).
"""

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from labram_jax import demo, host_memory, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/base.py:pretrain",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported model")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "devices of this process (e.g. 0,1,2,3); default: "
                                      "one per process under Slurm, all otherwise")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when this is one process of several; else nothing."""
    local_ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
    if _COORDINATOR.value:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes talk through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   local_device_ids=local_ids)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
            len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize(local_device_ids=local_ids)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    initialize_distributed()
    config = _CONFIG.value
    result = demo.run(config, _WORKDIR.value) if config.stage == "demo" else train.run(config, _WORKDIR.value)
    logging.getLogger("labram_jax").info("done: %s", result)


if __name__ == "__main__":
    host_memory.reexec_with_hugepages()
    app.run(main)
