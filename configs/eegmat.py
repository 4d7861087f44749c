"""EEGMAT, rest vs mental arithmetic, end to end on a CPU: `--config=configs/eegmat.py:<stage>`.

The small-data recipe (``configs/small_data.py``, chosen by subject-wise cross-validation)
on the 19 channels of EEGMAT, 5-s samples (19 x 5 patches), on **Euclidean-aligned, then
subject-centred records** (``python -m data_prep.centring --method euclidean+spectrum``: each
subject's windows multiplied by the inverse square root of its mean spatial covariance, then
each patch's spectrum divided by the subject's mean amplitude spectrum per channel; no labels
used) and therefore without the per-sample channel standardisation (``model.input_norm=none``),
with **learned spatial filters** ahead of the spectrum stem (``model.spatial_mix``, learning at
30 times the rate in fine-tuning: ``optim.lr_scales=spatial_mix=30``; fine-tuning adds them to the
pretrained encoder, which is trained without them), and **pretrained on the
training subjects' own recordings** (tokenizer 200 steps, masked pretraining 400 steps, batch 64,
4-s windows every 2 s: ``PRETRAIN_STEPS``, exactly the budget of the cross-validation). The
fine-tuning head reads each electrode's pooled tokens in its own slot
(``model.head_pooling=electrode``). In the 5-fold subject-wise CV (BENCHMARKS.md "Pretraining on
the training subjects"; 3 fine-tuning seeds on each fold's pretrained encoder, 15 runs) balanced
accuracy / AUROC went 0.600 / 0.689 (channel-standardised records) -> 0.719 / 0.769
(subject-centred, electrode head) -> 0.715 / 0.804 (aligned, then centred) -> 0.773 / 0.876
(spatial filters, from random weights) -> 0.820 / 0.909 (pretrained on each fold's 16 training
subjects: +0.047 / +0.033 over the same 15 runs; 0.829 / 0.919 when that pretraining leaves the
spatial filters out and fine-tuning adds them, as now: session 12). CSP + LDA on the same aligned-then-centred
records gets 0.807 / 0.881: the means are above it, by less than the folds' spread (CSP is ahead
on two of the five folds). Pretraining on EEGMMIDB instead collapses this tokenizer onto one code;
with ``tokenizer.target_band_hz=1-45`` it keeps 77, and fine-tuning from that encoder is a little
above random weights (0.789 / 0.891 against 0.773 / 0.876, 15 paired runs: higher in 9 and 10 of
15); on EEGMAT itself the band-limited tokenizer did worse. The paper's temporal stem in this recipe
(spatial filters ahead of its convolutions) is below the spectrum stem: 0.758 / 0.864 from random
weights, 0.778 / 0.905 pretrained the same way (15 runs each, session 15).
New subjects need the same preparation: convert their recordings, then align and centre them
(each subject on its own unlabelled windows), or through the API:
``model.predict(raw, reference=model.subject_reference([rest, task]))``.
Fine-tuning reads 5-s windows taken every second (data_prep --stride 1), validation the
non-overlapping ones, so the validation windows equal the classical baselines'; the tokenizer and
the masked model read 4-s windows every 2 s of the same recordings, without labels. Subjects 00-15
train every stage, subjects 16-19 validate:

    python -m data_prep ../shared/eeg/eegmat --out data/eegmat_s1 --window 5 --stride 1 \\
        --label-from filename --label-pattern '_1\\.edf$=rest' --label-pattern '_2\\.edf$=arithmetic' \\
        --subject-pattern 'Subject(\\d+)_' --val-subjects 16,17,18,19     # and --out data/eegmat without --stride,
        # and --out data/eegmat_pre with --window 4 --stride 2 (the pretraining windows)
    python -m data_prep.centring data/eegmat_s1/manifest.json --out data/eegmat_s1_aligned_centred \\
        --method euclidean+spectrum
    python -m data_prep.centring data/eegmat/manifest.json --out data/eegmat_aligned_centred --method euclidean+spectrum
    python -m data_prep.centring data/eegmat_pre/manifest.json --out data/eegmat_pre_aligned_centred \\
        --method euclidean+spectrum
    python -m labram_jax.main --config=configs/eegmat.py:tokenizer --workdir=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:pretrain --workdir=runs/eegmat/pretrain \\
        --config.pretrain.tokenizer_checkpoint=runs/eegmat/tokenizer
    python -m labram_jax.main --config=configs/eegmat.py:finetune --workdir=runs/eegmat/finetune \\
        --config.finetune.init_checkpoint=runs/eegmat/pretrain

``python -m benchmarks.transfer --task eegmat --centring aligned-signals`` runs it over 5 subject-wise
folds of the 20 subjects, several seeds and pretraining corpora, next to the classical baselines.
"""

from labram_jax_configs import common, small_data

TRAIN = "data/eegmat_s1_aligned_centred/manifest.json"  # 5-s windows every 1 s, aligned + centred (training split)
PRETRAIN = "data/eegmat_pre_aligned_centred/manifest.json"  # 4-s windows every 2 s, aligned + centred (unlabelled use)
# Tokenizer and masked-pretraining length at batch 64, the budget every corpus gets in benchmarks.transfer
PRETRAIN_STEPS = {"tokenizer": 200, "pretrain": 400}
PRETRAIN_WINDOWS = 4  # 4-s windows (19 x 4 patches) in the unlabelled stages
VAL = "data/eegmat_aligned_centred/manifest.json"  # non-overlapping 5-s windows, aligned + centred (validation split)


def get_config(arg=None):
    c = small_data.get_config(common.parse_arg(arg))
    c.model.input_norm = "none"  # centred records: each subject's gain is already divided out, keep the rest
    # fine-tuning adds the spatial filters to an encoder pretrained without them (the table starts at the
    # identity): in the 5-fold CV (3 seeds, 15 paired runs) 0.829 / 0.919 against 0.820 / 0.909 with the
    # table pretrained too (session 12); pretraining's gain is not the table's
    c.model.spatial_mix = c.stage == "finetune"
    c.data.max_channels = 19
    if c.stage in PRETRAIN_STEPS:  # tokenizer and masked model: unlabelled 4-s windows, the CV's budget
        c.data.train, c.data.max_windows = PRETRAIN, PRETRAIN_WINDOWS
        c.optim.total_steps = PRETRAIN_STEPS[c.stage]
        c.optim.warmup_steps = PRETRAIN_STEPS[c.stage] // 10
    if c.stage == "finetune":
        c.data.train, c.data.val, c.data.max_windows = TRAIN, VAL, 5
        c.model.head_pooling = "electrode"  # chosen on the 5-fold CV (3 seeds) over the mean over channels
        # the spatial-filter table starts at the identity; at the recipe's lr (1e-4) it barely moves and
        # changes nothing (5-fold CV, seed 0: 0.712 / 0.809 with the filters, 0.712 / 0.811 without; 10 x:
        # 0.702 / 0.805; 30 x: 0.782 / 0.883, and 0.773 / 0.876 over 3 seeds; 100 x: 0.761 / 0.860)
        c.optim.lr_scales = "spatial_mix=30"
    return c
