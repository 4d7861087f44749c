"""The README's main job: `python -m labram_jax.main --config=configs/demo.py --workdir=DIR`.

data_prep on the bundled EEGMAT excerpts (20 subjects, one minute of rest and one of mental
arithmetic each), then LaBraM-Tiny's tokenizer, masked EEG pretraining and fine-tuning on
subjects 00-15 with the small-data recipe (``configs/small_data.py``), then the metrics on
held-out subjects 16-19 next to classical baselines. About three minutes on 2 CPU cores.
"""

import ml_collections

from labram_jax_configs import small_data

STEPS = {"tokenizer": 100, "pretrain": 150, "finetune": 300}


def _stage(name):
    c = small_data.get_config(name)
    c.data.batch_size = 32
    c.data.max_channels = 19
    c.data.max_windows = 5
    c.optim.total_steps = STEPS[name]
    c.optim.warmup_steps = STEPS[name] // 10
    c.log_every = 50
    c.eval_every = STEPS[name]  # held-out subjects are evaluated once, at the end: nothing is picked on them
    c.checkpoint_every = 100
    return c


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "demo"
    c.seed = 0  # every stage's seed (--config.seed=1 reruns the whole demo with another)
    c.data_dir = ""  # default: the recordings bundled in labram_jax/demo_data
    c.stages = ml_collections.ConfigDict({name: _stage(name) for name in STEPS})
    c.lock()
    return c
