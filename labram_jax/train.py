"""``run(config, workdir)``: one trainer for the three stages, read top to bottom.

Phases: set-up -> mesh -> data -> stage -> abstract state and shardings -> init or
restore -> compile the step -> loop (log, evaluate, checkpoint) -> final save.
"""

from __future__ import annotations

import dataclasses
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
import numpy as np
import optax

from labram_jax import (checkpointing, config_validation, convert, evaluate, input_pipeline, metrics as metrics_lib,
                        optim, sharding)
from labram_jax.tasks import finetune, pretrain, stage as stage_lib, tokenizer

log = logging.getLogger("labram_jax")
STAGES = {"tokenizer": tokenizer.build, "pretrain": pretrain.build, "finetune": finetune.build}


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"config.model.dtype={name!r}: use auto, float32 or bfloat16")
    return dtypes[name]


def schedule_lengths(config, num_train: int) -> tuple[int, int]:
    """(total steps, warmup steps) from the config's epochs, or its explicit step counts."""
    steps_per_epoch = max(1, math.ceil(num_train / config.data.batch_size))
    total = config.optim.total_steps or config.optim.epochs * steps_per_epoch
    warmup = config.optim.warmup_steps if config.optim.warmup_steps >= 0 else config.optim.warmup_epochs * steps_per_epoch
    return int(total), int(min(warmup, total))


@dataclasses.dataclass
class StateSpec:
    """The abstract train state, its shardings and the optimizer that goes with it."""

    abstract: stage_lib.TrainState
    shardings: stage_lib.TrainState
    abstract_vars: dict
    init: Callable
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def state_spec(config, stage: stage_lib.Stage, mesh, rules, dummy: dict, init_key, total_steps: int,
               warmup_steps: int) -> StateSpec:
    """Shapes first: abstract variables -> shardings -> optimizer -> abstract train state."""
    abstract_vars = jax.eval_shape(stage.init, init_key, dummy)
    var_shardings = sharding.logical_shardings(abstract_vars, mesh, rules)
    abstract_params = nn.unbox(abstract_vars)["params"]
    opt_cfg = optim.OptimConfig(lr=config.optim.lr, min_lr=config.optim.min_lr, total_steps=total_steps,
                                warmup_steps=warmup_steps, b1=config.optim.b1, b2=config.optim.b2,
                                weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip,
                                layer_decay=config.optim.layer_decay)
    trainable = stage.trainable(abstract_params) if stage.trainable else None
    tx, schedule = optim.make_optimizer(opt_cfg, abstract_params, stage.depth, trainable)

    def init_state(key):
        params, extra = stage_lib.split_variables(stage.init(key, dummy))
        return stage_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                    extra=extra)

    abstract = jax.eval_shape(init_state, init_key)
    param_shardings = var_shardings["params"]
    shardings = stage_lib.TrainState(
        step=sharding.replicated(mesh), params=param_shardings,
        opt_state=optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh)),
        extra={k: v for k, v in var_shardings.items() if k in abstract.extra})
    return StateSpec(abstract, shardings, abstract_vars, init_state, tx, schedule)


def dummy_batch(grid: input_pipeline.Grid) -> dict:
    """One empty sample of the batch grid, for shape inference."""
    dummy = {k: v[None] for k, v in grid.empty().items()}
    dummy["valid"] = np.ones((1,), bool)
    return dummy


def make_train_step(stage: stage_lib.Stage, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    step_key: jax.Array) -> Callable:
    """``train_step(state, batch, frozen) -> (state, metrics)``: one optimizer update.

    A step whose loss, gradient norm or new parameter norm is not finite is not applied
    (the old state is kept, only the step counter advances); ``metrics["finite"]`` says so.
    """
    def train_step(state, batch, frozen):
        key = jax.random.fold_in(step_key, state.step)
        grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)
        (loss, (step_metrics, extra)), grads = grad_fn(state.params, state.extra, batch, key, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        kept = state.replace(step=state.step + 1)  # a non-finite update is never applied
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
        step_metrics = {**step_metrics, "grad_norm": grad_norm, "param_norm": param_norm, "lr": schedule(state.step),
                        "finite": finite}
        return new_state, step_metrics

    return train_step


def compile_train_step(train_step: Callable, spec: StateSpec, stage: stage_lib.Stage, mesh, dummy: dict,
                       batch_size: int):
    """Lowers and compiles ``train_step`` for a global batch of ``batch_size`` on ``mesh``
    (call under ``jax.set_mesh(mesh)`` and the logical axis rules). The state is donated."""
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in dummy.items()}
    abstract_batch = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=batch_shardings[k])
                      for k, v in dummy.items()}
    frozen_shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), stage.frozen)
    abstract_frozen = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                             stage.frozen, frozen_shardings) if stage.frozen is not None else None
    jitted = jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings, frozen_shardings),
                     out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return jitted.lower(checkpointing.abstract_with_shardings(spec.abstract, spec.shardings), abstract_batch,
                        abstract_frozen).compile()


@dataclasses.dataclass
class Restored:
    state: stage_lib.TrainState
    predict_fn: Callable
    grid: input_pipeline.Grid
    mesh: jax.sharding.Mesh
    step: int


def restore_for_inference(config, workdir: str, which: str = "latest", devices=None) -> Restored:
    """A fine-tuning run's state from ``checkpoints_best`` (``best``), the newest
    (``latest``) or a given step of ``checkpoints``, placed on a mesh of ``devices``."""
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices)
    rules = sharding.rules_from_config()
    stage = STAGES[config.stage](config, compute_dtype(config.model.dtype))
    grid = input_pipeline.Grid(config.data.max_channels, config.data.max_windows)
    spec = state_spec(config, stage, mesh, rules, dummy_batch(grid), jax.random.key(0), 1, 0)
    directory = os.path.join(workdir, "checkpoints_best" if which == "best" else "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, every=1)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}" + (
                " (a best checkpoint needs data.val during training; try --checkpoint latest)" if which == "best" else ""))
        step = max(steps) if which in ("best", "latest") else int(which)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; present: {steps}")
        state, _ = ckpt.restore(step, checkpointing.abstract_with_shardings(spec.abstract, spec.shardings))
    finally:
        ckpt.close()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        predict_fn = jax.jit(stage.predict)
    return Restored(state, predict_fn, grid, mesh, step)


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
    config_validation.validate(config, len(devices) if devices is not None else jax.device_count())
    _probe_workdir(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    dtype = compute_dtype(config.model.dtype)
    init_key, prepare_key, step_key = jax.random.split(jax.random.key(config.seed), 3)

    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices)
    rules = sharding.rules_from_config()
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % batch_ways:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by data x fsdp = {batch_ways}")
    log.info("process %d/%d, %d devices (%s), mesh %s, compute %s", jax.process_index(), jax.process_count(),
             jax.device_count(), jax.default_backend(), dict(mesh.shape), jnp.dtype(dtype).name)

    # ------------------------------------------------------------------ data
    grid = input_pipeline.Grid(config.data.max_channels, config.data.max_windows)
    num_train = input_pipeline.count_records(config.data.train, "train")
    total_steps, warmup_steps = schedule_lengths(config, num_train)
    log.info("%d training records, global batch %d, %d steps (%d warmup)", num_train, config.data.batch_size,
             total_steps, warmup_steps)

    # ------------------------------------------------------------------ stage
    stage = STAGES[config.stage](config, dtype)
    dummy = dummy_batch(grid)

    # ------------------------------------------------------------------ abstract state and shardings
    spec = state_spec(config, stage, mesh, rules, dummy, init_key, total_steps, warmup_steps)
    abstract_state, state_shardings, tx, schedule = spec.abstract, spec.shardings, spec.tx, spec.schedule
    rows = sharding.parameter_table(spec.abstract_vars["params"], state_shardings.params)
    if is_main:
        sharding.log_parameter_table(rows, log)
    sharding.check_large_params_sharded(rows, mesh)

    # ------------------------------------------------------------------ init or restore
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                      config.checkpoint_keep)
    best_ckpt = None
    if stage.predict and config.data.val:
        best_ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints_best"), 1, 1,
                                               best_metric=config.finetune.best_metric, async_save=False)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, checkpointing.abstract_with_shardings(abstract_state, state_shardings))
        start_step = int(data_state["step"])
        log.info("resumed from %s/checkpoints/%d", workdir, latest)
    else:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = jax.jit(spec.init, out_shardings=state_shardings)(init_key)
        start_step = 0
    frozen = jax.device_put(stage.frozen, sharding.replicated(mesh)) if stage.frozen is not None else None

    # ------------------------------------------------------------------ compile the step
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        compiled_step = compile_train_step(make_train_step(stage, tx, schedule, step_key), spec, stage, mesh,
                                           dummy, config.data.batch_size)
        log.info("compiled the %s step in %.1f s; memory: %s", stage.name, time.perf_counter() - t0,
                 _memory_summary(compiled_step))
        predict_fn = jax.jit(stage.predict) if stage.predict else None
        prepare_fn = jax.jit(stage.prepare, out_shardings=state_shardings) if stage.prepare else None

    # ------------------------------------------------------------------ loop
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    progress = metrics_lib.Progress(total_steps, config.data.batch_size, start_step)
    batches = input_pipeline.train_iterator(config.data.train, grid, config.data.batch_size, config.seed,
                                            start_step, jax.process_index(), jax.process_count(),
                                            config.data.num_workers)
    preemption = _Preemption()
    input_guard = input_pipeline.InputGuard(config.data.train, "train")
    nonfinite = _NonFiniteGuard(config.nonfinite_policy, config.max_skipped_steps,
                                int(data_state.get("skipped_steps", 0)) if latest is not None else 0,
                                lambda s: _describe_batch(config, workdir, s, is_main))
    last_metrics: dict = {}
    step = start_step
    needs_prepare = prepare_fn is not None and stage.needs_prepare(state)  # checked once: a host sync
    config_json = json.loads(config.to_json_best_effort())
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
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
                if predict_fn and config.data.val and (step % config.eval_every == 0 or step == total_steps):
                    scores, targets, _ = evaluate.predict_split(predict_fn, state, config.data.val, "val", grid, mesh,
                                                                config.data.batch_size, config.finetune.task)
                    eval_metrics = finetune.compute_metrics(config.finetune.task, scores, targets)
                    writer.write(step, {f"val/{k}": v for k, v in eval_metrics.items()})
                    log.info("step %d validation: %s", step, _fmt(eval_metrics))
                    last_metrics = {**last_metrics, **{f"val/{k}": v for k, v in eval_metrics.items()}}
                    if best_ckpt is not None and math.isfinite(eval_metrics.get(config.finetune.best_metric, math.nan)):
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
            export(stage, state, os.path.join(workdir, "model.npz"), is_main)
            if stage.name == "tokenizer" and is_main:
                usage = sharding.to_host(state.extra["codebook"]["quantizer"]["cluster_size"])
                metrics_lib.plot_codebook_usage(usage, os.path.join(workdir, "codebook_usage.png"))
    finally:
        preemption.restore()
        ckpt.close()
        if best_ckpt is not None:
            best_ckpt.close()
        writer.close()
    if is_main:
        metrics_lib.plot_curves(workdir)
    return {"step": step, **last_metrics}


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


def export(stage: stage_lib.Stage, state, path: str, is_main: bool) -> None:
    """Writes the trained model (params + non-trainable collections) as ``model.npz``."""
    variables = {"params": sharding.to_host(state.params), **sharding.to_host(state.extra)}
    if is_main:
        convert.save_variables(path, stage.export_kind, stage.model, variables)
        log.info("wrote %s", path)


def compiled_memory(compiled) -> dict[str, int] | None:
    """Bytes per device of a compiled step from XLA's memory analysis: arguments, outputs,
    temporaries, aliased (donated arguments reused as outputs) and their total; None where the
    backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):
        return None
    if m is None:
        return None
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def _memory_summary(compiled) -> str:
    m = compiled_memory(compiled)
    if m is None:
        return "n/a"
    mib = 1 << 20
    return (f"arguments {m['arguments'] / mib:.1f} MiB, outputs {m['outputs'] / mib:.1f} MiB, "
            f"temporaries {m['temporaries'] / mib:.1f} MiB, total {m['total'] / mib:.1f} MiB (per device)")


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
