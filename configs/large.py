"""LaBraM-Large: `--config=configs/large.py:<tokenizer|pretrain|finetune>`."""

from labram_jax_configs import common


def get_config(arg=None):
    return common.get_config("large", common.parse_arg(arg))
