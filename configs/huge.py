"""LaBraM-Huge: `--config=configs/huge.py:<tokenizer|pretrain|finetune>`."""

from labram_jax_configs import common


def get_config(arg=None):
    return common.get_config("huge", common.parse_arg(arg))
