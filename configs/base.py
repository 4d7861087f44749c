"""LaBraM-Base: `--config=configs/base.py:<tokenizer|pretrain|finetune>`."""

from labram_jax_configs import common


def get_config(arg=None):
    return common.get_config("base", common.parse_arg(arg))
