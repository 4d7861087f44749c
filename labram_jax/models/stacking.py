"""The two layouts of transformer-block parameters, and conversion between them.

Per block (the default, and what every file holds): ``blocks_0``, ..., ``blocks_{n-1}``,
each a subtree of one block's parameters. Stacked (``TransformerConfig.scan_blocks``): one
``blocks`` subtree whose every leaf has a leading ``layers`` axis of length n, as
``nn.scan`` creates it. Model files (``model.npz``) and official checkpoints are always
per block, so they load into either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

STACKED = "blocks"
_PER_BLOCK = re.compile(r"blocks_(\d+)$")


def is_stacked_path(names) -> bool:
    """Whether a parameter path (a sequence of names) lies under a stacked ``blocks``."""
    return STACKED in [str(n) for n in names]


def block_numbers(tree: Mapping) -> list[int]:
    return sorted(int(m.group(1)) for k in tree if (m := _PER_BLOCK.match(str(k))))


def stack_blocks(tree: Any) -> Any:
    """Per-block -> stacked, wherever ``blocks_i`` keys appear (encoder, decoder ...)."""
    if not isinstance(tree, Mapping):
        return tree
    numbers = block_numbers(tree)
    out = {k: stack_blocks(v) for k, v in tree.items() if not _PER_BLOCK.match(str(k))}
    if numbers:
        if numbers != list(range(len(numbers))):
            raise ValueError(f"blocks are not numbered 0..{len(numbers) - 1}: {numbers}")
        parts = [tree[f"blocks_{i}"] for i in numbers]
        out[STACKED] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *parts)
    return out


def unstack_blocks(tree: Any) -> Any:
    """Stacked -> per-block, wherever a ``blocks`` subtree appears."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: unstack_blocks(v) for k, v in tree.items() if k != STACKED}
    if STACKED in tree:
        leaves = jax.tree_util.tree_leaves(tree[STACKED])
        depth = int(np.shape(leaves[0])[0])
        for i in range(depth):
            out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], tree[STACKED])
    return out


def has_stacked(tree: Any) -> bool:
    """Whether a stacked ``blocks`` subtree appears anywhere in ``tree``."""
    return isinstance(tree, Mapping) and (STACKED in tree or any(has_stacked(v) for v in tree.values()))


def match_layout(source: Any, target: Mapping) -> Any:
    """``source`` in the layout of ``target`` (stacked if target has a ``blocks`` subtree)."""
    return stack_blocks(unstack_blocks(source)) if has_stacked(target) else unstack_blocks(source)
