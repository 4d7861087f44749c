"""Orbax checkpoints: train state + data-iterator state + config; the only Orbax import.

A checkpoint directory ``<workdir>/checkpoints/<step>/`` holds ``state`` (the sharded
train state, every process writing its shards), ``data`` (the iterator state: the
global step and sample position, enough to re-derive the data order on any process
count) and ``config`` (JSON). Saves are asynchronous and committed atomically by
Orbax; restore goes through an abstract tree carrying the *target* mesh's
shardings, so a checkpoint restores onto a different mesh shape.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``every`` steps, keeps the newest ``keep`` (or the best by a metric).

    Only one asynchronous manager may run per job: in multi-process runs, two would
    race on Orbax's barrier names. Extra managers (the best checkpoint) save synchronously.
    """

    def __init__(self, directory: str, every: int, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        self.directory = os.path.abspath(directory)
        best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1), enable_async_checkpointing=async_save,
            best_fn=best_fn, best_mode=best_mode, keep_checkpoints_without_metrics=best_metric is None,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def should_save(self, step: int) -> bool:
        """Whether a non-forced ``save(step)`` would write (the interval, and the first step)."""
        return self.manager.should_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False,
             metrics: dict | None = None) -> bool:
        """Starts an asynchronous save; returns whether one was started."""
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                          config=ocp.args.JsonSave(config)),
            force=force, metrics=metrics)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``(state, data_state)``; ``abstract_state`` carries the target shardings."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def saved_config(self, step: int) -> dict:
        """The config (JSON) saved with checkpoint ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` placed with ``shardings`` (for restore)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

