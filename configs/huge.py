"""LaBraM-Huge: `--config=configs/huge.py:<tokenizer|pretrain|finetune>`."""

from configs import common


def get_config(arg=None):
    return common.get_config("huge", common.parse_arg(arg))
