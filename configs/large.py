"""LaBraM-Large: `--config=configs/large.py:<tokenizer|pretrain|finetune>`."""

from configs import common


def get_config(arg=None):
    return common.get_config("large", common.parse_arg(arg))
