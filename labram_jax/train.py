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

from labram_jax import checkpointing, convert, evaluate, input_pipeline, metrics as metrics_lib, optim, sharding
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
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise OSError(f"workdir {workdir} is not writable ({err}); choose another --workdir") from None
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
    def train_step(state, batch, frozen):
        key = jax.random.fold_in(step_key, state.step)
        grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)
        (loss, (step_metrics, extra)), grads = grad_fn(state.params, state.extra, batch, key, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_metrics = {**step_metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        return new_state, step_metrics

    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in dummy.items()}
    abstract_batch = {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype,
                                              sharding=batch_shardings[k]) for k, v in dummy.items()}
    frozen_shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), stage.frozen)
    abstract_frozen = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                             stage.frozen, frozen_shardings) if stage.frozen is not None else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        compiled_step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                                out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,)).lower(
            checkpointing.abstract_with_shardings(abstract_state, state_shardings), abstract_batch,
            abstract_frozen).compile()
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
    last_metrics: dict = {}
    step = start_step
    needs_prepare = prepare_fn is not None and stage.needs_prepare(state)  # checked once: a host sync
    config_json = json.loads(config.to_json_best_effort())
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < total_steps:
                local = next(batches)
                local.pop("position")
                batch = sharding.to_global(local, mesh)
                if needs_prepare:
                    log.info("initialising the codebook with k-means on the first global batch")
                    state = prepare_fn(state, batch, prepare_key)
                    needs_prepare = False
                state, step_metrics = compiled_step(state, batch, frozen)
                step += 1
                if step % config.log_every == 0 or step == total_steps:
                    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    if not math.isfinite(host["loss"]):
                        raise FloatingPointError(f"non-finite loss at step {step}; last checkpoint: "
                                                 f"{ckpt.latest_step()}")
                    host.update(progress.report(step, host))
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
                data_state = {"step": step, "seed": config.seed, "global_batch": config.data.batch_size}
                stop = preemption.requested or (
                    "stop_after" if config.stop_after and step - start_step >= config.stop_after else None)
                if stop and step < total_steps:
                    log.warning("%s: saving a checkpoint at step %d and stopping; rerun the same command to "
                                "resume", stop, step)
                    ckpt.save(step, state, data_state, config_json, force=True)
                    break
                ckpt.save(step, state, data_state, config_json, force=step == total_steps)
        # -------------------------------------------------------------- final save
        ckpt.wait()
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


def export(stage: stage_lib.Stage, state, path: str, is_main: bool) -> None:
    """Writes the trained model (params + non-trainable collections) as ``model.npz``."""
    variables = {"params": sharding.to_host(state.params), **sharding.to_host(state.extra)}
    if is_main:
        convert.save_variables(path, stage.export_kind, stage.model, variables)
        log.info("wrote %s", path)


def _memory_summary(compiled) -> str:
    try:
        m = compiled.memory_analysis()
        if m is None:
            return "n/a"
        mib = 1 << 20
        return (f"arguments {m.argument_size_in_bytes / mib:.1f} MiB, outputs {m.output_size_in_bytes / mib:.1f} MiB, "
                f"temporaries {m.temp_size_in_bytes / mib:.1f} MiB (per device)")
    except (AttributeError, NotImplementedError):
        return "n/a"


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
