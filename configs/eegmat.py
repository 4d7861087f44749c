"""EEGMAT, rest vs mental arithmetic, end to end on a CPU: `--config=configs/eegmat.py:<stage>`.

The small-data recipe (``configs/small_data.py``, chosen by subject-wise cross-validation)
on the 19 channels of EEGMAT, 5-s samples (19 x 5 patches), on **subject-centred records**
(``python -m data_prep.centring``: each patch's spectrum divided by its subject's mean
amplitude spectrum per channel, no labels used) and therefore without the per-sample channel
standardisation (``model.input_norm=none``). In the 5-fold subject-wise CV (BENCHMARKS.md
"Subject centring") this lifted fine-tuning from 0.600 / 0.689 to 0.664 / 0.761 balanced accuracy /
AUROC (3 seeds each); the classical anchors gain as much from centring. The fine-tuning head
reads each electrode's pooled tokens in its own slot (``model.head_pooling=electrode``):
0.719 / 0.769 against 0.664 / 0.761 with the mean over channels, over the same 15 fold x seed
runs (balanced accuracy higher in 11, AUROC in 14; BENCHMARKS.md "The electrode head"). New subjects need
centred input too: convert their recordings, then centre them (each subject on its own windows),
or through the API: ``model.predict(raw, reference=model.subject_reference([rest, task]))``.
Training reads 5-s windows taken every second (data_prep --stride 1), validation the
non-overlapping ones, so the validation windows equal the classical baselines'. Subjects 00-15
train every stage (pretraining uses the same recordings without labels), subjects 16-19 validate:

    python -m data_prep ../shared/eeg/eegmat --out data/eegmat_s1 --window 5 --stride 1 \\
        --label-from filename --label-pattern '_1\\.edf$=rest' --label-pattern '_2\\.edf$=arithmetic' \\
        --subject-pattern 'Subject(\\d+)_' --val-subjects 16,17,18,19     # and --out data/eegmat without --stride
    python -m data_prep.centring data/eegmat_s1/manifest.json --out data/eegmat_s1_centred
    python -m data_prep.centring data/eegmat/manifest.json --out data/eegmat_centred
    python -m labram_jax.main --config=configs/eegmat.py:tokenizer --workdir=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:pretrain --workdir=runs/eegmat/pretrain \\
        --config.pretrain.tokenizer_checkpoint=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:finetune --workdir=runs/eegmat/finetune \\
        --config.finetune.init_checkpoint=runs/eegmat/pretrain

``python -m benchmarks.transfer --task eegmat --centring signals`` runs it over 5 subject-wise
folds of the 20 subjects, several seeds and pretraining corpora, next to the classical baselines.
"""

from labram_jax_configs import common, small_data

TRAIN = "data/eegmat_s1_centred/manifest.json"  # 5-s windows every 1 s, subject-centred (training split used)
VAL = "data/eegmat_centred/manifest.json"  # non-overlapping 5-s windows, subject-centred (validation split used)


def get_config(arg=None):
    c = small_data.get_config(common.parse_arg(arg))
    c.data.train = TRAIN
    c.data.max_channels = 19
    c.data.max_windows = 5
    c.model.input_norm = "none"  # centred records: each subject's gain is already divided out, keep the rest
    if c.stage == "finetune":
        c.data.val = VAL
        c.model.head_pooling = "electrode"  # chosen on the 5-fold CV (3 seeds) over the mean over channels
    return c
