"""Memory planner: per-device memory of a training run for given meshes and batch sizes.

    python -m labram_jax.plan --config=configs/huge.py:pretrain --mesh=8,1,1 --mesh=1,8,1 \
        --batch=512 [--device_memory_gb=80] [--suggest] [--compile]

For each (mesh, global batch) it reports, per device: parameters (float32), gradients,
AdamW moments, activations kept for the backward pass, and their total; ``--suggest`` searches
the smallest power-of-two device count (and the mesh on it with the least model parallelism)
whose total fits ``--device_memory_gb`` with 10 % headroom; ``--compile`` also compiles the
step on this machine's devices (meshes whose size equals the local device count) and prints
XLA's memory analysis beside the estimate.

Where the numbers come from: parameter shapes from ``jax.eval_shape`` of the stage's init, their
sharding from the logical-axis rules (``labram_jax.sharding``) applied to each mesh; the optimizer
holds two float32 moments per parameter; activations follow the per-token count in
:func:`block_activation_bytes` (what autodiff keeps per transformer block), times the local batch.
Meshes need not exist here: a v5p-64 slice is planned on a laptop.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from labram_jax import compile_options, input_pipeline, sharding, steps
from labram_jax.models import config as model_config
from labram_jax.tasks import pretrain as pretrain_task

GIB = 1 << 30
HEADROOM = 0.9  # plan to use at most 90 % of device memory (XLA needs scratch, fragmentation)


@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int
    fsdp: int
    tensor: int

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def __str__(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


def parse_mesh(text: str) -> Mesh:
    try:
        data, fsdp, tensor = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh={text!r}: give data,fsdp,tensor, e.g. 8,1,1") from None
    if min(data, fsdp, tensor) < 1:
        raise ValueError(f"--mesh={text!r}: sizes must be >= 1")
    return Mesh(data, fsdp, tensor)


def sharded_bytes(abstract_boxed, mesh: Mesh, rules, dtype_bytes: int | None = None) -> tuple[int, int]:
    """(total bytes, bytes on one device) of a tree of logically-partitioned abstract arrays."""
    leaves = jax.tree_util.tree_leaves(abstract_boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    total = per_device = 0
    for leaf in leaves:
        names = getattr(leaf, "names", None)
        value = getattr(leaf, "value", leaf)
        itemsize = dtype_bytes or jnp.dtype(value.dtype).itemsize
        spec = nn.logical_to_mesh_axes(names, rules) if names else (None,) * len(value.shape)
        shard = []
        for dim, axes in zip(value.shape, tuple(spec) + (None,) * (len(value.shape) - len(spec))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            shard.append(math.ceil(dim / int(np.prod([mesh.shape[a] for a in axes]) if axes else 1)))
        total += int(np.prod(value.shape)) * itemsize
        per_device += int(np.prod(shard)) * itemsize
    return total, per_device


def block_activation_bytes(cfg: model_config.TransformerConfig, tokens: int, dtype_bytes: int, tensor: int) -> float:
    """Bytes one transformer block keeps for the backward pass, per sample.

    Per token: the two LayerNorm inputs and outputs, the attention and MLP outputs and the
    residual (about 7 x D, replicated over ``tensor``); q, k, v, the normalised q and k and the
    attention output (6 x D, split over heads); the MLP hidden before and after GELU (2 x M,
    split); plus the attention probabilities H x L per token (split over heads).
    """
    d, m, h, length = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, tokens
    per_token = 7 * d + (6 * d + 2 * m + h * length) / tensor
    return length * per_token * dtype_bytes


def encoder_activation_bytes(cfg: model_config.TransformerConfig, tokens: int, dtype_bytes: int, tensor: int,
                             remat: str) -> float:
    """Activations of a whole encoder pass per sample: every block, or with ``remat=block`` the
    block inputs plus one block's worth (recomputed in the backward pass)."""
    block = block_activation_bytes(cfg, tokens, dtype_bytes, tensor)
    embed = tokens * (cfg.embed_dim * 4 + 25 * max(cfg.temporal_channels, 1) * 6) * dtype_bytes  # temporal encoder
    if remat == "block":
        return embed + cfg.depth * tokens * cfg.embed_dim * dtype_bytes + block
    return embed + cfg.depth * block


def stage_models(config):
    """(stage object, encoder cfgs with their pass count per sample, extra activation bytes per sample)."""
    dtype = steps.compute_dtype(config.model.dtype)
    grid_tokens = config.data.max_channels * config.data.max_windows + 1
    if config.stage == "pretrain":
        stage = pretrain_task.build(config, dtype, tokenizer=pretrain_task.random_tokenizer(config, dtype, abstract=True))
        # float32 logits, softmax and its gradient, of one piece of the tokens at a time
        # (pretrain.loss_chunks; 0 = all at once): nothing of them is kept for the backward pass
        piece = -(-(grid_tokens - 1) // max(config.pretrain.loss_chunks, 1))
        logits = piece * config.model.vocab_size * 4 * 3
        return stage, [(stage.model.cfg, 2)], logits, grid_tokens
    stage = steps.build_stage(config, dtype)
    if config.stage == "tokenizer":
        return stage, [(stage.model.cfg.encoder, 1), (stage.model.cfg.decoder, 1)], \
            (grid_tokens - 1) * 200 * 4 * 6, grid_tokens
    return stage, [(stage.model.cfg, 1)], 0, grid_tokens


def _grid(config):
    return input_pipeline.Grid(config.data.max_channels, config.data.max_windows)


def estimate(config, stage, encoders, extra_per_sample: int, tokens: int, mesh: Mesh, global_batch: int) -> dict:
    """Per-device bytes of one training step's state and activations on ``mesh``."""
    rules = sharding.rules_from_config(config)
    abstract = jax.eval_shape(stage.init, jax.random.key(0), steps.dummy_batch(_grid(config)))
    params_total, params = sharded_bytes(abstract["params"], mesh, rules, dtype_bytes=4)
    local_batch = global_batch / (mesh.data * mesh.fsdp)
    act_bytes = jnp.dtype(steps.compute_dtype(config.model.dtype)).itemsize
    per_sample = sum(n * encoder_activation_bytes(cfg, tokens, act_bytes, mesh.tensor, config.model.remat)
                     for cfg, n in encoders) + extra_per_sample / mesh.tensor
    activations = per_sample * local_batch
    # Working set of the backward pass: the block being differentiated needs its activations'
    # gradients and the attention's dP and dS next to the stored ones; the batch itself; and the
    # optimizer's update before it replaces the (donated) parameters.
    biggest = max(encoders, key=lambda e: e[0].embed_dim)[0]
    workspace = local_batch * (2 * block_activation_bytes(biggest, tokens, act_bytes, mesh.tensor)
                               + (tokens - 1) * model_config.PATCH_SIZE * 4) + params
    frozen = 0
    if stage.frozen is not None:
        frozen = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(stage.frozen))
    row = {"mesh": str(mesh), "devices": mesh.devices, "global_batch": global_batch, "local_batch": local_batch,
           "parameters_total_gib": params_total / GIB, "params_gib": params / GIB, "grads_gib": params / GIB,
           "adam_gib": 2 * params / GIB, "frozen_gib": frozen / GIB, "activations_gib": activations / GIB,
           "workspace_gib": workspace / GIB}
    row["total_gib"] = sum(row[k] for k in ("params_gib", "grads_gib", "adam_gib", "frozen_gib", "activations_gib",
                                            "workspace_gib"))
    return row


def compiled_gib(config, stage, mesh: Mesh, global_batch: int) -> float | None:
    """XLA's per-device memory of the compiled step on this machine's devices (None when the
    mesh does not match the local device count), compiled with XLA's default options: the plan
    is for accelerators, where the CPU-only options of ``labram_jax.compile_options`` (which cut
    CPU temporaries by about a fifth) do not apply."""
    if mesh.devices != jax.device_count():
        return None
    real = sharding.make_mesh((mesh.data, mesh.fsdp, mesh.tensor))
    key = jax.random.key(0)
    with compile_options.xla_defaults():
        built = steps.build(config, stage, real, sharding.rules_from_config(config), _grid(config), global_batch,
                            key, key, 1000, 10)
    memory = steps.compiled_memory(built.compiled)
    return memory["total"] / GIB if memory else None


def candidate_meshes(devices: int, heads: int, global_batch: int) -> list[Mesh]:
    """Meshes of ``devices`` devices: tensor in powers of two dividing the heads, fsdp in powers
    of two, the batch divisible by data x fsdp; least model parallelism first."""
    out = []
    tensor = 1
    while tensor <= devices and heads % tensor == 0:
        fsdp = 1
        while tensor * fsdp <= devices:
            if devices % (tensor * fsdp) == 0:
                mesh = Mesh(devices // (tensor * fsdp), fsdp, tensor)
                if global_batch % (mesh.data * mesh.fsdp) == 0:
                    out.append(mesh)
            fsdp *= 2
        tensor *= 2
    return sorted(out, key=lambda m: (m.tensor * m.fsdp, m.tensor))


def suggest(config, stage, encoders, extra, tokens, global_batch: int, memory_gib: float, max_devices: int = 4096):
    """The smallest power-of-two device count, and its least-parallel mesh, that fits."""
    heads = encoders[0][0].num_heads
    devices = 1
    while devices <= max_devices:
        for mesh in candidate_meshes(devices, heads, global_batch):
            row = estimate(config, stage, encoders, extra, tokens, mesh, global_batch)
            if row["total_gib"] <= HEADROOM * memory_gib:
                return row
        devices *= 2
    return None


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/huge.py:pretrain", lock_config=True)
_MESH = flags.DEFINE_multi_string("mesh", [], "data,fsdp,tensor (repeatable)")
_BATCH = flags.DEFINE_multi_integer("batch", [], "global batch sizes (default: the config's)")
_MEMORY = flags.DEFINE_float("device_memory_gb", 80.0, "memory per device in GiB (H100 80, v5p 95, v4 32)")
_SUGGEST = flags.DEFINE_bool("suggest", False, "search the smallest mesh that fits")
_COMPILE = flags.DEFINE_bool("compile", False, "also compile on local devices and print XLA's memory analysis")


def print_rows(rows: list[dict], memory_gib: float) -> None:
    print(f"{'mesh':>10} {'batch':>6} {'local':>6} {'params':>7} {'grads':>7} {'adam':>7} {'frozen':>7} "
          f"{'activ.':>8} {'work':>7} {'total':>8} {'XLA':>8}  fits {memory_gib:g} GiB")
    for r in rows:
        xla = f"{r['compiled_gib']:8.2f}" if r.get("compiled_gib") is not None else f"{'-':>8}"
        fits = "yes" if r["total_gib"] <= HEADROOM * memory_gib else "no"
        print(f"{r['mesh']:>10} {r['global_batch']:>6} {r['local_batch']:>6g} {r['params_gib']:7.2f} "
              f"{r['grads_gib']:7.2f} {r['adam_gib']:7.2f} {r['frozen_gib']:7.2f} {r['activations_gib']:8.2f} "
              f"{r['workspace_gib']:7.2f} {r['total_gib']:8.2f} {xla}  {fits}")


def planning_dtype(config) -> str:
    """The compute dtype to plan for: ``auto`` means an accelerator's bfloat16."""
    return "bfloat16" if config.model.dtype == "auto" else config.model.dtype


def main(argv):
    del argv
    config = _CONFIG.value
    with config.unlocked():
        config.model.dtype = planning_dtype(config)
    stage, encoders, extra, tokens = stage_models(config)
    batches = _BATCH.value or [config.data.batch_size]
    meshes = [parse_mesh(m) for m in _MESH.value] or [Mesh(jax.device_count(), 1, 1)]
    print(f"{config.stage} {config.model.size}: grid {config.data.max_channels} x {config.data.max_windows} "
          f"({tokens} tokens), compute {config.model.dtype}, remat {config.model.remat}; per device, GiB")
    rows = []
    for mesh in meshes:
        for batch in batches:
            row = estimate(config, stage, encoders, extra, tokens, mesh, batch)
            if _COMPILE.value:
                row["compiled_gib"] = compiled_gib(config, stage, mesh, batch)
            rows.append(row)
    print_rows(rows, _MEMORY.value)
    if _SUGGEST.value:
        for batch in batches:
            best = suggest(config, stage, encoders, extra, tokens, batch, _MEMORY.value)
            if best is None:
                print(f"batch {batch}: nothing up to 4096 devices fits {_MEMORY.value:g} GiB; try --config.model.remat=block")
            else:
                print(f"batch {batch}: smallest fit {best['devices']} devices, mesh {best['mesh']} "
                      f"(data x fsdp x tensor), {best['total_gib']:.1f} GiB per device")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
