"""``run(config, workdir)``: one trainer for the three stages, read top to bottom.

Phases: set-up -> mesh -> data -> stage -> abstract state and shardings -> init or
restore -> compile the step -> loop (log, evaluate, checkpoint) -> final save.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from labram_jax import (checkpointing, compile_options, config_schema, data_spec, evaluate, input_pipeline,
                        metrics as metrics_lib, model_file, sharding, steps)
from labram_jax.tasks import stage as stage_lib

log = logging.getLogger("labram_jax")


class NonFiniteError(FloatingPointError):
    """Training stopped on a NaN/inf loss, gradient norm or parameter (the message says where)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, unwritable directory)."""


class _NonFiniteGuard:
    """Collects each step's on-device finiteness flag and checks them in one host sync.

    The step itself never applies a non-finite update (the state is kept), so parameters
    and checkpoints stay finite whatever the policy; checking here only decides whether
    to go on (``skip``, up to ``max_skipped``) or stop (``stop``), with the batch's provenance.
    """

    def __init__(self, policy: str, max_skipped: int, skipped: int, describe: Callable[[int], str]):
        self.policy, self.max_skipped, self.skipped, self.describe = policy, max_skipped, skipped, describe
        self.pending: list[tuple[int, jax.Array]] = []

    def add(self, step_index: int, finite: jax.Array) -> None:
        self.pending.append((step_index, finite))

    def check(self, last_good: int | None) -> None:
        if not self.pending:
            return
        flags = jax.device_get([f for _, f in self.pending])
        bad = [s for (s, _), ok in zip(self.pending, flags) if not ok]
        self.pending = []
        if not bad:
            return
        self.skipped += len(bad)
        where = self.describe(bad[0])
        if self.policy == "stop" or self.skipped > self.max_skipped:
            why = ("config.nonfinite_policy='stop'" if self.policy == "stop" else
                   f"{self.skipped} skipped updates > config.max_skipped_steps={self.max_skipped}")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad[0] + 1} ({why}); the update was not applied. {where}. "
                f"Last good checkpoint: {'step ' + str(last_good) if last_good is not None else 'none'}; "
                "fix or remove the data, or lower the learning rate, then rerun the same command to resume")
        log.warning("non-finite loss or gradient at step(s) %s: update skipped (%d skipped in this run, limit %d). %s",
                    [s + 1 for s in bad], self.skipped, self.max_skipped, where)


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a final checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains one stage; resumes from the latest checkpoint in ``workdir``. Returns the last metrics.

    ``devices`` restricts the mesh to some of the devices (tests compare meshes this way).
    """
    # ------------------------------------------------------------------ set-up
    config_schema.validate(config, len(devices) if devices is not None else jax.device_count())
    _probe_workdir(workdir)
    is_main = jax.process_index() == 0
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    dtype = steps.compute_dtype(config.model.dtype)
    init_key, prepare_key, step_key = jax.random.split(jax.random.key(config.seed), 3)

    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices)
    rules = sharding.rules_from_config(config)
    log.info("process %d/%d, %d devices (%s), mesh %s, compute %s", jax.process_index(), jax.process_count(),
             jax.device_count(), jax.default_backend(), dict(mesh.shape), jnp.dtype(dtype).name)

    # ------------------------------------------------------------------ data
    grid = input_pipeline.Grid(config.data.max_channels, config.data.max_windows)
    train_sources = data_spec.DataSpec.parse(config.data.train).sources("train")  # resolved once
    val_sources = data_spec.DataSpec.parse(config.data.val).sources("val") if config.data.val else None
    centring = data_spec.subject_centring(config.data.train)  # the input the model learns; saved with it
    if config.data.val:
        data_spec.check_centring_matches(centring, config.data.val, "config.data.val")
    num_train = input_pipeline.count_records(train_sources)
    total_steps, warmup_steps = steps.schedule_lengths(config, num_train)
    log.info("%d training records, global batch %d, %d steps (%d warmup)", num_train, config.data.batch_size,
             total_steps, warmup_steps)

    # ------------------------------------------------------------------ stage, abstract state, compiled step
    stage = steps.build_stage(config, dtype)
    t0 = time.perf_counter()
    built = steps.build(config, stage, mesh, rules, grid, config.data.batch_size, init_key, step_key, total_steps,
                        warmup_steps)
    spec, compiled_step = built.spec, built.compiled
    log.info("compiled the training step in %.1f s; memory: %s", time.perf_counter() - t0,
             steps.memory_summary(compiled_step))
    rows = sharding.parameter_table(spec.abstract_vars["params"], spec.shardings.params)
    if is_main:
        sharding.log_parameter_table(rows, log)
    sharding.check_large_params_sharded(rows, mesh)

    # ------------------------------------------------------------------ init or restore
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                      config.checkpoint_keep)
    evaluating = stage.predict is not None and val_sources is not None
    best_ckpt = None
    if evaluating and stage.best_metric:
        best_ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints_best"), 1, 1,
                                               best_metric=stage.best_metric, async_save=False)
    latest = ckpt.latest_step()
    conflicts = config_schema.resume_conflicts(ckpt.saved_config(latest), config) if latest is not None else []
    if conflicts:
        raise ValueError(f"{workdir} holds a run trained with other settings ({'; '.join(conflicts)}): resume it "
                         "with the config it was started with, or give this config a new --workdir")
    if is_main:  # after the check: a refused resume leaves the run's own config.json
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    if latest is not None:
        state, data_state = ckpt.restore(latest, checkpointing.abstract_with_shardings(spec.abstract, spec.shardings))
        start_step = int(data_state["step"])
        log.info("resumed from %s/checkpoints/%d", workdir, latest)
    else:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = jax.jit(spec.init, out_shardings=spec.shardings)(init_key)
        start_step = 0
    frozen = jax.device_put(stage.frozen, sharding.replicated(mesh)) if stage.frozen is not None else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        predict_fn = compile_options.jit(stage.predict) if evaluating else None
        prepare_fn = compile_options.jit(stage.prepare, out_shardings=spec.shardings) if stage.prepare else None

    # ------------------------------------------------------------------ loop
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    progress = metrics_lib.Progress(total_steps, config.data.batch_size, start_step)
    batches = input_pipeline.train_iterator(train_sources, grid, config.data.batch_size, config.seed,
                                            start_step, jax.process_index(), jax.process_count(),
                                            config.data.num_workers)
    preemption = _Preemption()
    input_guard = input_pipeline.InputGuard(train_sources, "train")
    nonfinite = _NonFiniteGuard(config.nonfinite_policy, config.max_skipped_steps,
                                int(data_state.get("skipped_steps", 0)) if latest is not None else 0,
                                lambda s: _describe_batch(config, workdir, s, is_main))
    last_metrics: dict = {}
    step = start_step
    needs_prepare = prepare_fn is not None and stage.needs_prepare(state)  # checked once: a host sync
    config_json = json.loads(config.to_json_best_effort())
    try:
        with set_up_frozen(), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < total_steps:
                local = next(batches)
                input_guard.take(local)
                batch = sharding.to_global(local, mesh)
                if needs_prepare:
                    log.info("initialising the codebook with k-means on the first global batch")
                    state = prepare_fn(state, batch, prepare_key)
                    needs_prepare = False
                state, step_metrics = compiled_step(state, batch, frozen)
                nonfinite.add(step, step_metrics["finite"])
                step += 1
                stop = preemption.requested or (
                    "stop_after" if config.stop_after and step - start_step >= config.stop_after else None)
                saving = bool(stop) or step == total_steps or ckpt.should_save(step)
                if saving or step % config.log_every == 0:
                    nonfinite.check(ckpt.latest_step())
                if step % config.log_every == 0 or step == total_steps:
                    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    host.update(progress.report(step, host), skipped_steps=nonfinite.skipped,
                                bad_records=input_guard.count)
                    writer.write(step, {f"train/{k}": v for k, v in host.items()})
                    last_metrics = host
                if evaluating and (step % config.eval_every == 0 or step == total_steps):
                    scores, targets, _ = evaluate.predict_split(predict_fn, state, val_sources, "val", grid, mesh,
                                                                config.data.batch_size, stage.target)
                    eval_metrics = stage.metrics(scores, targets)
                    writer.write(step, {f"val/{k}": v for k, v in eval_metrics.items()})
                    log.info("step %d validation: %s", step, _fmt(eval_metrics))
                    last_metrics = {**last_metrics, **{f"val/{k}": v for k, v in eval_metrics.items()}}
                    if best_ckpt is not None and math.isfinite(eval_metrics.get(stage.best_metric, math.nan)):
                        best_ckpt.save(step, state, {"step": step}, config_json, force=True, metrics=eval_metrics)
                data_state = {"step": step, "seed": config.seed, "global_batch": config.data.batch_size,
                              "skipped_steps": nonfinite.skipped}
                if stop and step < total_steps:
                    log.warning("%s: saving a checkpoint at step %d and stopping; rerun the same command to "
                                "resume", stop, step)
                    _save(ckpt, step, state, data_state, config_json, force=True)
                    break
                if saving:
                    _save(ckpt, step, state, data_state, config_json, force=step == total_steps)
        # -------------------------------------------------------------- final save
        _wait(ckpt)
        if step == total_steps:
            host = stage_lib.TrainState(step=step, params=sharding.to_host(state.params), opt_state=None,
                                        extra=sharding.to_host(state.extra))
            if is_main:
                model_file.save(os.path.join(workdir, model_file.FILENAME), stage.name, stage.model,
                                {"params": host.params, **host.extra}, subject_centring=centring)
                log.info("wrote %s", os.path.join(workdir, model_file.FILENAME))
                if stage.artefacts:
                    stage.artefacts(host, workdir)
    finally:
        preemption.restore()
        ckpt.close()
        if best_ckpt is not None:
            best_ckpt.close()
        writer.close()
    if is_main:
        metrics_lib.plot_curves(workdir)
    return {"step": step, **last_metrics}


@contextlib.contextmanager
def set_up_frozen():
    """Python's full collections skip the objects alive on entry (``gc.freeze``) until the block ends.

    A run's set-up objects (models, traced and compiled functions, sources: ~300 k at Base) live
    for the whole loop; unfrozen, one full collection every 20-45 steps scans them all (0.21-0.23 s
    at Base on 2 cores, 1-1.7 % of the steps' time; BENCHMARKS.md "Session 30"). Unfrozen on exit,
    unless the caller had frozen objects itself.
    """
    caller_froze = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not caller_froze:
            gc.unfreeze()


def _probe_workdir(workdir: str) -> None:
    """Fails early, with what to do, when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok" * 4096)  # a few KiB: a full disk fails here, not at the first checkpoint
        os.remove(probe)
    except OSError as err:
        raise CheckpointWriteError(f"workdir {workdir} is not writable ({err.strerror or err}): free space or "
                                   "choose another --workdir") from None


def _save(ckpt: checkpointing.Checkpointer, step: int, state, data_state: dict, config_json: dict,
          force: bool) -> None:
    """Starts a save; a failure (this one or the previous asynchronous one) stops the run
    with what to do. Orbax commits atomically, so the last complete checkpoint stays valid."""
    try:
        ckpt.save(step, state, data_state, config_json, force=force)
    except Exception as err:  # noqa: BLE001 - Orbax wraps OSError in several types
        raise _write_error(ckpt, step, err) from err


def _wait(ckpt: checkpointing.Checkpointer) -> None:
    try:
        ckpt.wait()
    except Exception as err:  # noqa: BLE001
        raise _write_error(ckpt, None, err) from err


def _write_error(ckpt: checkpointing.Checkpointer, step: int | None, err: Exception) -> CheckpointWriteError:
    try:
        last = ckpt.latest_step()
    except Exception:  # noqa: BLE001
        last = None
    when = f" (noticed when saving step {step}; an earlier asynchronous save may be the one that failed)" \
        if step is not None else ""
    return CheckpointWriteError(
        f"could not write a checkpoint to {ckpt.directory}{when} ({type(err).__name__}: {err}). Free disk space or fix the "
        f"directory's permissions, then rerun the same command: it resumes from the last complete checkpoint "
        f"({'step ' + str(last) if last is not None else 'none yet'}), which a failed save does not touch")


def _describe_batch(config, workdir: str, step_index: int, is_main: bool) -> str:
    """Provenance of training step ``step_index``'s global batch: summary, and a JSON file."""
    samples = input_pipeline.batch_provenance(config.data.train, config.seed, config.data.batch_size, step_index)
    path = os.path.join(workdir, f"nonfinite_step_{step_index + 1}.json")
    if is_main:
        with open(path, "w") as f:
            json.dump(samples, f, indent=1)
    ranked = sorted(samples, key=lambda e: -e.get("peak_uv", math.inf))
    shown = ", ".join(f"{e.get('dataset', '?')}/{e.get('recording', e['shard'])}@{e.get('start_s', '?')}s "
                      f"(peak {e.get('peak_uv', math.nan):.3g} uV)" for e in ranked[:3])
    return f"The batch ({len(samples)} samples, listed in {path}) holds, largest amplitudes first: {shown}"


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
