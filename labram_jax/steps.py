"""Shapes first: a stage's abstract train state, its shardings, and its compiled training step.

Used by the trainer (``train.run``), evaluation (``restore_for_inference``), the memory
planner and the benchmarks, so the sequence grid -> dummy batch -> abstract state ->
shardings -> step -> compiled step is written once (:func:`build`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from labram_jax import checkpointing, compile_options, input_pipeline, optim, sharding
from labram_jax.models import config as model_config
from labram_jax.tasks import finetune, pretrain, tokenizer
from labram_jax.tasks import stage as stage_lib

STAGE_BUILDERS = {"tokenizer": tokenizer.build, "pretrain": pretrain.build, "finetune": finetune.build}


def build_stage(config, dtype, **options) -> stage_lib.Stage:
    """The stage ``config.stage`` of ``config``, computing in ``dtype``."""
    if config.stage not in STAGE_BUILDERS:
        raise ValueError(f"config.stage={config.stage!r}: choose one of {sorted(STAGE_BUILDERS)}")
    return STAGE_BUILDERS[config.stage](config, dtype, **options)


def compute_dtype(name: str):
    """``auto`` (float32 on CPU, bfloat16 on accelerators), ``float32`` or ``bfloat16``."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in model_config.DTYPES:
        raise ValueError(f"config.model.dtype={name!r}: use one of {model_config.DTYPES}")
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


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
    optimizer: optim.Optimizer


def dummy_batch(grid: input_pipeline.Grid) -> dict:
    """One empty sample of the batch grid, for shape inference."""
    dummy = {k: v[None] for k, v in grid.empty().items()}
    dummy["valid"] = np.ones((1,), bool)
    return dummy


def state_spec(config, stage: stage_lib.Stage, mesh, rules, dummy: dict, init_key, total_steps: int,
               warmup_steps: int) -> StateSpec:
    """Shapes first: abstract variables -> shardings -> optimizer -> abstract train state."""
    abstract_vars = jax.eval_shape(stage.init, init_key, dummy)
    var_shardings = sharding.logical_shardings(abstract_vars, mesh, rules)
    abstract_params = nn.unbox(abstract_vars)["params"]
    opt_cfg = optim.OptimConfig(lr=config.optim.lr, min_lr=config.optim.min_lr, total_steps=total_steps,
                                warmup_steps=warmup_steps, b1=config.optim.b1, b2=config.optim.b2,
                                weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip,
                                layer_decay=config.optim.layer_decay,
                                lr_scales=optim.parse_lr_scales(config.optim.lr_scales),
                                implementation=config.optim.implementation)
    trainable = stage.trainable(abstract_params) if stage.trainable else None
    optimizer = optim.make_optimizer(opt_cfg, abstract_params, stage.depth, trainable)
    tx = optimizer.tx

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
    return StateSpec(abstract, shardings, abstract_vars, init_state, optimizer)


def make_train_step(stage: stage_lib.Stage, optimizer: optim.Optimizer, step_key: jax.Array) -> Callable:
    """``train_step(state, batch, frozen) -> (state, metrics)``: one optimizer update.

    A step whose loss or gradient norm (with the ``xla`` optimizer also: new parameter norm) is not
    finite is not applied (the old state is kept, only the step counter advances);
    ``metrics["finite"]`` says so (:meth:`labram_jax.optim.Optimizer.apply`).
    """
    def train_step(state, batch, frozen):
        key = jax.random.fold_in(step_key, state.step)
        grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)
        (loss, (step_metrics, extra)), grads = grad_fn(state.params, state.extra, batch, key, frozen)
        params, opt_state, grad_norm, param_norm, finite = optimizer.apply(grads, state.opt_state, state.params, loss)
        extra = jax.tree.map(lambda new, old: jnp.where(finite, new, old), extra, state.extra)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        step_metrics = {**step_metrics, "grad_norm": grad_norm, "param_norm": param_norm,
                        "lr": optimizer.schedule(state.step), "finite": finite}
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
    jitted = compile_options.jit(train_step, in_shardings=(spec.shardings, batch_shardings, frozen_shardings),
                                 out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return jitted.lower(checkpointing.abstract_with_shardings(spec.abstract, spec.shardings), abstract_batch,
                        abstract_frozen).compile()


@dataclasses.dataclass
class Built:
    """A stage ready to train: its state spec, the dummy batch and the compiled step."""

    spec: StateSpec
    dummy: dict
    compiled: object


def build(config, stage: stage_lib.Stage, mesh, rules, grid: input_pipeline.Grid, batch_size: int, init_key,
          step_key, total_steps: int, warmup_steps: int, wrap: Callable[[Callable], Callable] | None = None) -> Built:
    """dummy batch -> state spec -> train step -> compiled step, under the mesh and rules.
    ``wrap`` may wrap the step function before it is traced (benchmarks count traces)."""
    dummy = dummy_batch(grid)
    spec = state_spec(config, stage, mesh, rules, dummy, init_key, total_steps, warmup_steps)
    step = make_train_step(stage, spec.optimizer, step_key)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = compile_train_step(wrap(step) if wrap else step, spec, stage, mesh, dummy, batch_size)
    return Built(spec, dummy, compiled)


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


def memory_summary(compiled) -> str:
    m = compiled_memory(compiled)
    if m is None:
        return "n/a"
    mib = 1 << 20
    return (f"arguments {m['arguments'] / mib:.1f} MiB, outputs {m['outputs'] / mib:.1f} MiB, "
            f"temporaries {m['temporaries'] / mib:.1f} MiB, total {m['total'] / mib:.1f} MiB (per device)")


@dataclasses.dataclass
class Restored:
    state: stage_lib.TrainState
    stage: stage_lib.Stage
    predict_fn: Callable
    grid: input_pipeline.Grid
    mesh: jax.sharding.Mesh
    step: int


def restore_for_inference(config, workdir: str, which: str = "latest", devices=None) -> Restored:
    """A run's state from ``checkpoints_best`` (``best``), the newest (``latest``) or a given
    step of ``checkpoints``, placed on a mesh of ``devices``, with its stage's predict function."""
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices)
    rules = sharding.rules_from_config(config)
    stage = build_stage(config, compute_dtype(config.model.dtype))
    if stage.predict is None:
        raise ValueError(f"a {config.stage} run makes no predictions to evaluate; evaluate a fine-tuning run")
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
        predict_fn = compile_options.jit(stage.predict)
    return Restored(state, stage, predict_fn, grid, mesh, step)
