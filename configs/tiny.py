"""LaBraM-Tiny: `--config=configs/tiny.py:<tokenizer|pretrain|finetune>`."""

from configs import common


def get_config(arg=None):
    return common.get_config("tiny", common.parse_arg(arg))
