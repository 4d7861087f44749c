"""LaBraM-Tiny, for tests and CPU smoke runs: `--config=configs/tiny.py:<stage>`.

A 2-block, 100-wide model and a 256 x 16 codebook; seconds per stage on a CPU.
Point it at data with --config.data.train=.../manifest.json (and data.val).
"""

from labram_jax_configs import common


def get_config(arg=None):
    c = common.get_config("tiny", common.parse_arg(arg))
    c.data.batch_size = 8
    c.data.max_channels = 19
    c.data.max_windows = 4
    c.optim.total_steps = 20
    c.optim.warmup_steps = 2
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    if c.stage == "tokenizer":
        c.tokenizer.code_dim = 16
        c.optim.lr = 1e-3
    return c
