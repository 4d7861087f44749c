"""Shared configuration: the LaBraM recipes of LABRAM.md section 6 as data.

Every size file calls ``get_config(size, stage)``; the stage is chosen on the command
line with ``--config=configs/<size>.py:<stage>`` (tokenizer, pretrain, finetune) and
fields are overridden with ``--config.optim.lr=...``. Every field, its default and its
check live in the library (``labram_jax.config_schema``); this file holds the recipes. The
returned ConfigDict is locked: a misspelled field is an error, not a silent default.
"""

import ml_collections

from labram_jax import config_schema

STAGES = config_schema.STAGES

# LABRAM.md section 6, per stage.
RECIPES = {
    "tokenizer": dict(batch_size=1024, lr=4e-4, min_lr=1e-5, epochs=100, warmup_epochs=10,
                      b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip=0.0),
    "pretrain": dict(batch_size=512, lr=5e-4, min_lr=1e-5, epochs=50, warmup_epochs=5,
                     b1=0.9, b2=0.98, weight_decay=0.05, grad_clip=3.0),
    "finetune": dict(batch_size=512, lr=5e-4, min_lr=1e-6, epochs=50, warmup_epochs=5,
                     b1=0.9, b2=0.999, weight_decay=0.05, grad_clip=0.0),
}
# Fine-tuning differs by size (LABRAM.md section 6).
FINETUNE_BY_SIZE = {
    "tiny": dict(layer_decay=0.65, drop_path=0.1, epochs=50, warmup_epochs=5),
    "base": dict(layer_decay=0.65, drop_path=0.1, epochs=50, warmup_epochs=5),
    "large": dict(layer_decay=0.8, drop_path=0.1, epochs=30, warmup_epochs=3),
    "huge": dict(layer_decay=0.8, drop_path=0.2, epochs=30, warmup_epochs=3),
}


def parse_arg(arg: str | None, default_stage: str = "pretrain") -> str:
    stage = arg or default_stage
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} after ':' in --config; choose one of {STAGES}")
    return stage


def get_config(size: str, stage: str) -> ml_collections.ConfigDict:
    """The full configuration of one stage for one model size: the fields' defaults
    (``labram_jax.config_schema``) with the recipe of LABRAM.md section 6."""
    c = config_schema.defaults(size, stage)
    recipe = dict(RECIPES[stage])
    c.data.batch_size = recipe["batch_size"]
    for key in ("lr", "min_lr", "epochs", "warmup_epochs", "b1", "b2", "weight_decay", "grad_clip"):
        setattr(c.optim, key, recipe[key])
    if stage == "finetune":
        by_size = FINETUNE_BY_SIZE[size]
        c.optim.layer_decay = by_size["layer_decay"]
        c.optim.epochs = by_size["epochs"]
        c.optim.warmup_epochs = by_size["warmup_epochs"]
        c.model.drop_path = by_size["drop_path"]
    return c
