"""EEGMAT, rest vs mental arithmetic, end to end on a CPU: `--config=configs/eegmat.py:<stage>`.

LaBraM-Tiny on the 19 channels of EEGMAT; subjects 00-15 train every stage (pretraining
uses the same recordings without labels), subjects 16-19 validate. 5-s samples (5 x 19
patches). Training reads 5-s windows taken every second (data_prep --stride 1), validation
the non-overlapping ones, so the validation windows equal the classical anchor's.

Not the paper's patch embedding: every stage embeds each 1-s patch by the log amplitudes
of its 1-45 Hz FFT bins (``model.patch_embed=spectrum``). The paper's temporal encoder
normalises the sample's band powers away before the transformer, and with 16 training
subjects the model never learns them back (BENCHMARKS.md "EEGMAT": 0.54 balanced accuracy
with it, 0.80 with the spectrum). Fine-tuning keeps the pretrained encoder close to where
pretraining left it (lr 1e-4, layer decay 0.3): the encoder otherwise drifts towards the
training subjects.

    python -m data_prep ../shared/eeg/eegmat --out data/eegmat_s1 --window 5 --stride 1 \\
        --label-from filename --label-pattern '_1\\.edf$=rest' --label-pattern '_2\\.edf$=arithmetic' \\
        --subject-pattern 'Subject(\\d+)_' --val-subjects 16,17,18,19     # and --out data/eegmat without --stride
    python -m labram_jax.main --config=configs/eegmat.py:tokenizer --workdir=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:pretrain --workdir=runs/eegmat/pretrain \\
        --config.pretrain.tokenizer_checkpoint=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:finetune --workdir=runs/eegmat/finetune \\
        --config.finetune.init_checkpoint=runs/eegmat/pretrain

``python -m benchmarks.eegmat`` runs all of it for several seeds, with the from-scratch
and linear-probe comparisons, and writes the table.
"""

from configs import common

TRAIN = "data/eegmat_s1/manifest.json"  # 5-s windows every 1 s (training split used)
VAL = "data/eegmat/manifest.json"  # non-overlapping 5-s windows (validation split used)


def get_config(arg=None):
    stage = common.parse_arg(arg)
    c = common.get_config("tiny", stage)
    c.data.train = TRAIN
    c.data.max_channels = 19
    c.data.max_windows = 5
    c.data.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 500
    c.model.patch_embed = "spectrum"  # every stage: log 1-45 Hz amplitudes, not the temporal encoder
    if stage == "tokenizer":
        c.tokenizer.code_dim = 16
        # 16 subjects are too little for the reference's commitment loss: with weight 1 (or 0.1)
        # every encoder output collapses onto one code within 20 steps (perplexity 1.0, restarts
        # of dead codes do not help); without it 157 of 256 codes stay in use (perplexity 40).
        c.tokenizer.commitment_weight = 0.0
        c.optim.lr = 1e-3
        c.optim.epochs, c.optim.warmup_epochs = 5, 1
    if stage == "pretrain":
        c.optim.lr = 1e-3
        c.optim.epochs, c.optim.warmup_epochs = 10, 1
    if stage == "finetune":
        c.data.val = VAL
        c.optim.lr = 1e-4
        c.optim.layer_decay = 0.3  # blocks 0.3 and 0.09, patch embedding 0.027 of the head's rate
        c.optim.epochs, c.optim.warmup_epochs = 10, 1
        c.finetune.class_weight = "balanced"  # 3:1 rest:task; balanced accuracy is the metric
        c.eval_every = 20
    return c
