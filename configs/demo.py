"""The README's main job: `python -m labram_jax.main --config=configs/demo.py --workdir=DIR`.

data_prep on the bundled EEGMAT excerpts, then a tiny LaBraM's tokenizer, masked EEG
pretraining and fine-tuning (rest vs mental arithmetic) on the CPU, then the
validation metrics. A few minutes on 2 cores.
"""

import ml_collections

from configs import common


def _stage(name, steps):
    c = common.get_config("tiny", name)
    c.data.batch_size = 16
    c.data.max_channels = 19
    c.data.max_windows = 5
    c.optim.total_steps = steps
    c.optim.warmup_steps = steps // 10
    c.log_every = 25
    c.eval_every = steps // 2
    c.checkpoint_every = 100
    c.compilation_cache_dir = ""
    if name == "tokenizer":
        c.tokenizer.code_dim = 16
        c.tokenizer.commitment_weight = 0.0  # on this little data it collapses the codebook (configs/eegmat.py)
        c.optim.lr = 1e-3
    if name == "finetune":
        c.optim.lr = 1e-3
        c.model.drop_path = 0.0
        c.finetune.class_weight = "balanced"  # 3:1 rest:arithmetic
    return c


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "demo"
    c.data_dir = ""  # default: the recordings bundled in labram_jax/demo_data
    c.stages = ml_collections.ConfigDict()
    c.stages.tokenizer = _stage("tokenizer", 150)
    c.stages.pretrain = _stage("pretrain", 150)
    c.stages.finetune = _stage("finetune", 200)
    c.lock()
    return c
