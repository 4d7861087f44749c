"""LaBraM-Base: `--config=configs/base.py:<tokenizer|pretrain|finetune>`."""

from configs import common


def get_config(arg=None):
    return common.get_config("base", common.parse_arg(arg))
