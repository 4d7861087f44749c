"""Device mesh, logical-axis rules, and the shardings of state and batches.

Parameters and activations carry logical axis names (see ``models/layers.py``);
the rules below are the defaults of ``config.sharding_rules`` (``labram_jax.config_schema``)
and map them onto the mesh axes
``("data", "fsdp", "tensor")``. One set of rules serves pure data parallelism
(fsdp = tensor = 1), FSDP (parameters sharded along ``embed``) and tensor
parallelism (heads, MLP and vocabulary split over ``tensor``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# logical name -> mesh axis (or axes, or None = replicated). Flax takes the first
# rule whose mesh axes are still free, so activations never reuse the batch's axes.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("code", None),
    ("freq", None),
    ("classes", None),
    ("electrodes", None),  # the electrode head's input (rows x width: no mesh axis divides it)
    ("spatial", None),
    ("time", None),
    ("norm", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
    ("layers", None),  # the stacked-blocks axis of nn.scan
    ("lora_in", None),
    ("lora", None),
    ("lora_out", None),
)
LARGE_PARAM = 2**18  # elements; parameters this big must be sharded on a multi-device mesh


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one entry may be -1 to take the remaining devices.

    Raises ValueError when the shape does not multiply to the device count.
    """
    devices = list(devices or jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh needs 3 sizes (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh data x fsdp x tensor = {shape} needs {int(np.prod(shape))} devices "
                         f"but {len(devices)} are present; set config.mesh (one size may be -1)")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def axes_text(axes: str | tuple[str, ...] | None) -> str:
    """A rule's mesh axes as the config writes them: ``fsdp``, ``data+fsdp``, or ``""`` (replicated)."""
    if axes is None:
        return ""
    return axes if isinstance(axes, str) else "+".join(axes)


def parse_axes(text: str) -> str | tuple[str, ...] | None:
    """The inverse of :func:`axes_text`: ``""`` -> None, ``fsdp`` -> ``"fsdp"``, ``data+fsdp`` -> a tuple."""
    parts = tuple(a for a in text.split("+") if a)
    return None if not parts else parts[0] if len(parts) == 1 else parts


def rules_from_config(config=None) -> tuple:
    """The logical axis rules of ``config.sharding_rules`` (logical name -> mesh axes as text,
    e.g. ``--config.sharding_rules.embed=tensor``), in the order of ``DEFAULT_RULES``; the
    defaults for a config without that group (or None)."""
    table = (config.get("sharding_rules") if config is not None else None) or {}
    return tuple((name, parse_axes(table[name]) if name in table else axes) for name, axes in DEFAULT_RULES)


def logical_shardings(abstract_boxed, mesh, rules):
    """NamedShardings of a tree of (possibly LogicallyPartitioned) abstract arrays."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assembles global arrays from each process's slice of the batch."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def to_host(tree):
    """Global arrays -> NumPy on every process (gathers shards across processes)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def parameter_table(abstract_boxed, shardings) -> list[tuple[str, tuple, tuple, P]]:
    """(name, shape, logical axes, mesh spec) of every parameter."""
    boxes = jax.tree_util.tree_leaves_with_path(abstract_boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    shards = jax.tree_util.tree_leaves(shardings)
    rows = []
    for (path, box), sharding in zip(boxes, shards):
        names = getattr(box, "names", ())
        value = getattr(box, "value", box)
        rows.append(("/".join(_key(p) for p in path), tuple(value.shape), tuple(names), sharding.spec))
    return rows


def _key(p) -> str:
    return str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))


def log_parameter_table(rows, logger: logging.Logger | None = None) -> None:
    logger = logger or logging.getLogger(__name__)
    total = sum(int(np.prod(r[1])) for r in rows)
    logger.info("%d parameters in %d arrays", total, len(rows))
    width = max(len(r[0]) for r in rows)
    for name, shape, names, spec in rows:
        logger.info("  %-*s %-22s %-40s %s", width, name, str(shape), str(names), tuple(spec))


def check_large_params_sharded(rows, mesh, threshold: int = LARGE_PARAM) -> None:
    """Raises if a parameter of ``threshold`` or more elements is fully replicated on a
    mesh that could shard it."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return  # pure data parallelism: replication is the intent
    bad = [(n, s) for n, s, _, spec in rows if int(np.prod(s)) >= threshold and all(a is None for a in spec)]
    if bad:
        raise ValueError(f"large parameters are replicated on mesh {dict(mesh.shape)}: {bad[:5]}; "
                         "check the logical axis rules (--config.sharding_rules.<logical name>=<mesh axes>)")

