"""Embeddings and predictions from Python, for notebooks and scripts.

    from labram_jax import api
    model = api.load("runs/finetune")              # a workdir, a model.npz, or official weights
    emb = model.embed(raw)                         # a file path, an mne.io.Raw, mne.Epochs, or an array + names + rate
    emb.windows.shape                              # (n_windows, D)
    probs = model.predict(raw)                     # (n_windows,) binary, (n_windows, K), or values

Reading and preprocessing are data_prep's (``labram_jax.reading``, ``labram_jax.preprocess``):
any format MNE reads, EEG channels mapped onto the vocabulary by name or, for caps without
10-20 names, by electrode position (``montage=labram_jax.montage.Options(...)``), 0.1-75 Hz
band-pass, notch, 200 Hz, units of 100 uV, non-overlapping windows of ``window_s`` seconds.
A model trained on subject-centred records (``python -m data_prep.centring``, spectrum centring
or Euclidean alignment; its model file says which, ``Predictor.subject_centring``) needs its input
centred the same way, on a reference taken from all of the subject's unlabelled recordings
together (they must cover the conditions the model tells apart: a rest file and a task file, not
one of them):

    ref = model.subject_reference([rest_raw, task_raw])   # once per subject, no labels
    probs = model.predict(task_raw, reference=ref)

or, for windows of many subjects at once, ``centre(x, subjects)`` on ``windows(...)`` before
``predict_windows``/``embed_windows``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import mne
import numpy as np

from labram_jax import compile_options, convert, hub, model_file
from labram_jax import montage as montage_lib
from labram_jax import preprocess as prep_lib
from labram_jax import reading, subject_centring
from labram_jax.tasks import finetune


POOLINGS = ("mean", "channel")  # how embed_windows pools a window's patch tokens


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Per-window and per-patch embeddings of one recording (or of epochs).

    Attributes:
      windows: [n, D] pooled embedding of each window (the classifier head's input).
      patches: [n, N, A, D] embedding of each channel x 1-s patch.
      channels: the N vocabulary names, in order.
      start_s: [n] start of each window in seconds (epoch index for Epochs).
      dropped: channels not used, with the reason.
      mapping: where each of the N channels came from (by name, nearest electrode or
        interpolation; ``labram_jax.montage.Plan.mapping``).
    """

    windows: np.ndarray
    patches: np.ndarray
    channels: tuple[str, ...]
    start_s: np.ndarray
    dropped: tuple[tuple[str, str], ...]
    mapping: tuple[dict, ...] = ()

    @property
    def per_channel(self) -> np.ndarray:
        """[n, N, D]: each channel's patch embeddings averaged over the window's 1-s patches
        (``pooling="channel"`` of :meth:`Predictor.embed_windows`, before flattening)."""
        return self.patches.mean(axis=2)


class Predictor:
    """A loaded model: ``embed`` always works; ``predict`` needs a fine-tuned head.

    ``subject_centring``: ``{"band_hz": [lo, hi]}``, ``{"method": ...}`` (``subject_centring.canonical``) for a model
    trained on subject-centred records (then its inputs are centred the same way, see the module
    docstring), else None."""

    def __init__(self, kind: str, model, variables: dict, task: str | None = None, window_s: int = 4,
                 notch: float = 50.0, montage: montage_lib.Options = montage_lib.Options(),
                 subject_centring: dict | None = None):
        self.kind, self.model, self.task = kind, model, task
        self.window_s, self.notch, self.montage = window_s, notch, montage
        self.subject_centring = subject_centring
        self.variables = jax.tree_util.tree_map(jnp.asarray, {k: v for k, v in variables.items()
                                                              if k in ("params", "codebook")})
        self._embed = compile_options.jit(self._embed_fn)
        self._logits = compile_options.jit(self._logits_fn) if kind == "finetune" else None

    # -- model calls -----------------------------------------------------------------
    def _embed_fn(self, variables, x, channel_ids):
        if self.kind == "finetune":
            out = self.model.apply(variables, x, channel_ids, method=self.model.embed)
            return out["pooled"], out["tokens"][:, 1:]
        hidden = self.model.apply(variables, x, channel_ids, jnp.zeros(x.shape[:1] + (x.shape[1] * x.shape[2],), bool))
        return hidden.mean(axis=1), hidden

    def _logits_fn(self, variables, x, channel_ids):
        return self.model.apply(variables, x, channel_ids)

    # -- inputs ------------------------------------------------------------------------
    def _windows(self, signals, ch_names, sfreq, unit, window_s, montage, reference=None):
        w = prepare_windows(signals, ch_names, sfreq, unit=unit, window_s=int(window_s or self.window_s),
                            notch=self.notch, montage=montage or self.montage)
        if reference is None:
            return w.prepared, w.x, w.start_s
        self._check_centring(reference)
        if reference.method != subject_centring.method_of(self.subject_centring):
            raise ValueError(f"this reference is for a {reference.method} model; this one is "
                             f"{subject_centring.describe(self.subject_centring)}: take the reference with this "
                             "model's subject_reference")
        if not np.array_equal(reference.rows, w.prepared.rows):
            raise ValueError(f"the reference holds channels {list(reference.names)}, this recording maps to "
                             f"{list(w.prepared.names)}: take the reference from recordings of the same montage")
        return w.prepared, subject_centring.apply(self.subject_centring, w.x, reference.values), w.start_s

    def _check_centring(self, reference) -> None:
        if reference is not None and not self.subject_centring:
            raise ValueError("this model was not trained on subject-centred records: call it without reference=")
        if reference is None and self.subject_centring:
            raise ValueError(f"this model was trained on {subject_centring.describe(self.subject_centring)} records: "
                             "pass reference=model.subject_reference([...all of the subject's recordings, "
                             "covering its conditions...]), or centre(x, subjects) windows yourself")

    def subject_reference(self, recordings: Sequence, ch_names: Sequence[str] | None = None,
                          sfreq: float | None = None, *, unit: str = "V", window_s: int | None = None,
                          montage: montage_lib.Options | None = None) -> "SubjectReference":
        """One subject's reference for a centred model, over all windows of ``recordings`` (each
        as ``signals`` of :meth:`embed`; one montage): the mean log amplitude spectrum per
        channel (spectrum centring) or the inverse square root of the mean spatial covariance
        (Euclidean alignment). No labels are used, but the recordings must cover the conditions
        the model compares in a usual mix (a subject seen in one condition only is centred onto it)."""
        if not self.subject_centring:
            raise ValueError("this model was not trained on subject-centred records: it needs no reference")
        if isinstance(recordings, (str, os.PathLike, np.ndarray, mne.io.BaseRaw, mne.BaseEpochs)):
            recordings = [recordings]
        prepared = [self._windows(r, ch_names, sfreq, unit, window_s, montage) for r in recordings]
        if not prepared or any(not np.array_equal(p[0].rows, prepared[0][0].rows) for p in prepared):
            raise ValueError("subject_reference needs one or more recordings that map to the same channels")
        x = np.concatenate([p[1] for p in prepared])
        return SubjectReference(np.asarray(prepared[0][0].rows), tuple(prepared[0][0].names),
                                subject_centring.reference(self.subject_centring, x),
                                subject_centring.method_of(self.subject_centring))

    def centre(self, x: np.ndarray, subjects: Sequence) -> np.ndarray:
        """Windows ``x [n, channels, windows, 200]`` (one montage, uncentred, as :meth:`windows`
        gives them) centred per subject as this model's training records were (``subjects [n]``:
        one id per window; each subject's reference is taken from all of its windows here, so
        pass all of a subject's windows at once)."""
        if not self.subject_centring:
            raise ValueError("this model was not trained on subject-centred records: give it windows as they are")
        return subject_centring.per_subject(self.subject_centring, x, subjects)

    def _run(self, fn, x, rows, batch_size):
        """``fn`` over x in batches of ``batch_size``; a last, shorter batch is zero-padded to a
        power of two (at most ``batch_size``) and its padding dropped from the outputs, so
        recordings of any length reuse a few compiled shapes instead of compiling one more each."""
        outs = []
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            size = min(batch_size, 1 << (len(chunk) - 1).bit_length())
            if size > len(chunk):
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            out = jax.device_get(fn(self.variables, jnp.asarray(chunk), jnp.asarray(rows)))
            outs.append(jax.tree_util.tree_map(lambda a: a[:min(batch_size, len(x) - i)], out))
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)

    # -- public ------------------------------------------------------------------------
    def embed(self, signals, ch_names: Sequence[str] | None = None, sfreq: float | None = None, *,
              unit: str = "V", window_s: int | None = None, batch_size: int = 32,
              montage: montage_lib.Options | None = None, reference: "SubjectReference | None" = None) -> Embeddings:
        """Embeddings of every window.

        ``signals``: a recording's path (any format data_prep reads), an ``mne.io.Raw``,
        ``mne.Epochs``, or an array ``[channels, samples]`` in ``unit`` (MNE's volts by default)
        with ``ch_names`` and ``sfreq``. ``montage`` places channels without 10-20 names by
        position (default: as data_prep does). Epochs are filtered one at a time, so the 0.1 Hz
        high-pass sees only each epoch: pass the continuous Raw when you have it. ``reference``:
        the subject's :meth:`subject_reference`, needed by (only) a model trained on centred records.
        """
        self._check_centring(reference)
        prepared, x, starts = self._windows(signals, ch_names, sfreq, unit, window_s, montage, reference)
        pooled, tokens = self._run(self._embed, x, prepared.rows, batch_size)
        n, c, a = x.shape[:3]
        return Embeddings(pooled, tokens.reshape(n, c, a, -1), tuple(prepared.names), np.asarray(starts),
                          tuple(prepared.dropped), tuple(prepared.mapping))

    def windows(self, signals, ch_names: Sequence[str] | None = None, sfreq: float | None = None, *,
                unit: str = "V", window_s: int | None = None, montage: montage_lib.Options | None = None,
                reference: "SubjectReference | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """What the model sees: ``(x [n, channels, windows, 200] float32 in units of 100 uV,
        channel rows [channels] int32)``; ``signals`` as for :meth:`embed`. The input of an
        exported model (``python -m labram_jax.export_model``). With ``reference`` (a centred
        model's) they come centred (dimensionless); without, as recorded, for :meth:`centre`."""
        prepared, x, _ = self._windows(signals, ch_names, sfreq, unit, window_s, montage, reference)
        return x.astype(np.float32), np.asarray(prepared.rows, np.int32)

    def predict(self, signals, ch_names: Sequence[str] | None = None, sfreq: float | None = None, *,
                unit: str = "V", window_s: int | None = None, batch_size: int = 32,
                montage: montage_lib.Options | None = None, reference: "SubjectReference | None" = None,
                mirror: str = "none") -> np.ndarray:
        """Class probabilities (binary: P(label 1) [n]; multi-class: [n, K]) or values [n];
        ``signals`` and ``reference`` as for :meth:`embed`, ``mirror`` (test-time left-right
        mirror averaging) as for :meth:`predict_windows`."""
        if self._logits is None:
            raise ValueError("this model has no task head (a pretrained encoder): fine-tune it first, or use embed()")
        self._check_centring(reference)
        prepared, x, _ = self._windows(signals, ch_names, sfreq, unit, window_s, montage, reference)
        return self.predict_windows(x, prepared.rows, batch_size, mirror)

    def predict_windows(self, x: np.ndarray, channel_rows: np.ndarray, batch_size: int = 32,
                        mirror: str = "none") -> np.ndarray:
        """:meth:`predict` of windows already prepared (:meth:`windows`, centred when the model
        needs it): x [n, channels, windows, 200] in units of 100 uV, channel_rows [channels].
        ``mirror``: ``swap`` averages each window's P(label 1) with 1 - that of the window
        left-right mirrored (each electrode's signal under its mirror's id: a left vs right model
        fine-tuned with ``finetune.mirror_label=swap``), ``keep`` with the mirror's own score
        (:func:`labram_jax.tasks.finetune.mirror_average`); a montage with an electrode that has
        no mirror is scored as it is."""
        if self._logits is None:
            raise ValueError("this model has no task head (a pretrained encoder): fine-tune it first, or use embed()")
        x = np.asarray(x, np.float32)
        scores = finetune.scores(self.task, jnp.asarray(self._run(self._logits, x, channel_rows, batch_size)))
        if mirror != "none":
            mirrored, flipped = finetune.mirror_for_scoring(jnp.asarray(channel_rows)[None])
            flipped = jnp.broadcast_to(flipped, scores.shape[:1])
            other = finetune.scores(self.task, jnp.asarray(self._run(self._logits, x, mirrored[0], batch_size)))
            scores = finetune.mirror_average(self.task, scores, other, flipped, mirror)
        return np.asarray(scores)

    def embed_windows(self, x: np.ndarray, channel_rows: np.ndarray, batch_size: int = 32,
                      pooling: str = "mean") -> np.ndarray:
        """Embeddings of windows already prepared (:meth:`windows`, centred when the model needs
        it), pooled by ``pooling``:

        - ``"mean"``: [n, D], the mean over every patch token (the classifier head's input);
        - ``"channel"``: [n, N * D], each channel's tokens averaged over the window's 1-s
          patches, channels concatenated in the order of ``channel_rows``. It keeps which
          electrode carries what, which the mean over channels averages away: the input of a
          linear probe on a fixed montage (BENCHMARKS.md "Transfer": on EEGMAT +0.01-0.03
          balanced accuracy and AUROC over ``"mean"`` for random and EEGMAT-pretrained
          encoders, level for an EEGMMIDB-pretrained one).
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {POOLINGS}")
        x = np.asarray(x, np.float32)
        pooled, tokens = self._run(self._embed, x, channel_rows, batch_size)
        if pooling == "mean":
            return pooled
        n, c, a = x.shape[:3]
        return tokens.reshape(n, c, a, -1).mean(axis=2).reshape(n, -1)


@dataclasses.dataclass(frozen=True)
class SubjectReference:
    """One subject's reference for a model trained on centred records
    (:meth:`Predictor.subject_reference`): ``rows [C]`` vocabulary rows and ``names`` of its
    channels; ``values``: ``{"log_amplitude": [C, 101]}`` mean log |FFT| of its 1-s patches per
    1-Hz bin (spectrum centring) and/or ``{"whitening": [C, C]}`` ``R^-1/2`` (Euclidean
    alignment); ``method`` says which."""

    rows: np.ndarray
    names: tuple[str, ...]
    values: dict[str, np.ndarray]
    method: str


@dataclasses.dataclass(frozen=True)
class Windows:
    """Prepared input: ``x [n, channels, windows, 200]`` float32 in units of 100 uV, the
    preprocessed recording (``prepared.rows``, ``.names``, ``.dropped``, ``.mapping``) and the
    start of each window (s; the epoch index for epochs)."""

    x: np.ndarray
    prepared: prep_lib.Prepared
    start_s: np.ndarray


def prepare_windows(signals, ch_names: Sequence[str] | None = None, sfreq: float | None = None, *, unit: str = "V",
                    window_s: int = 4, notch: float = 50.0,
                    montage: montage_lib.Options = montage_lib.Options()) -> Windows:
    """LaBraM's preprocessing (as data_prep's) of a recording's path, an ``mne.io.Raw``, an
    ``mne.Epochs``, an array ``[channels, samples]`` or epochs ``[n, channels, samples]`` (arrays
    in ``unit`` with ``ch_names`` and ``sfreq``), cut into windows of ``window_s`` seconds.
    Each epoch is one sample of ``floor(its duration)`` seconds (1..16). A continuous recording's
    channels are filtered and resampled in blocks on every usable core (the same result)."""
    scale = {"V": 1.0, "mV": 1e-3, "uV": 1e-6}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be 'V', 'mV' or 'uV', got {unit!r}")
    if isinstance(signals, (str, os.PathLike)):
        try:
            signals = reading.read_raw(signals)
        except reading.ReadError as err:
            raise ValueError(f"{signals}: {err}") from None
    if isinstance(signals, np.ndarray) and signals.ndim == 3:
        if ch_names is None or sfreq is None:
            raise ValueError("epochs given as an array [n, channels, samples] need ch_names and sfreq")
        signals = mne.EpochsArray(signals * scale, mne.create_info(list(ch_names), float(sfreq), "eeg"),
                                  verbose="error")
    if isinstance(signals, mne.BaseEpochs):
        pieces = []
        for epoch in signals.get_data():
            raw = mne.io.RawArray(epoch, signals.info, verbose="error")
            win = max(1, min(16, int(raw.n_times / raw.info["sfreq"])))
            prepared = prep_lib.preprocess(raw, prep_lib.Params(window_s=win, stride_s=float(win), notch=notch),
                                           options=montage)
            pieces.append((prepared, prepared.data[:, :win * 200].reshape(len(prepared.names), win, 200)))
        if len({p[1].shape for p in pieces}) != 1:
            raise ValueError("epochs of different lengths or channels: crop them to one length first")
        return Windows(np.stack([p[1] for p in pieces]), pieces[0][0], np.arange(len(pieces), dtype=np.float64))
    if not isinstance(signals, mne.io.BaseRaw):
        data = np.asarray(signals, np.float64)
        if data.ndim != 2 or ch_names is None or sfreq is None:
            raise ValueError("pass a file path, an mne.io.Raw, mne.Epochs, or an array [channels, samples] (or "
                             "[epochs, channels, samples]) with ch_names and sfreq")
        signals = mne.io.RawArray(data * scale, mne.create_info(list(ch_names), float(sfreq), "eeg"),
                                  verbose="error")
    params = prep_lib.Params(window_s=window_s, stride_s=float(window_s), notch=notch)
    # every usable core filters and resamples a block of channels: the same result, and on a GPU host
    # this host-side work was 80-95 % of embed's time (BENCHMARKS.md, "GPU")
    prepared = prep_lib.preprocess(signals, params, options=montage, threads=prep_lib.usable_cpus())
    starts = prep_lib.window_starts(prepared.data.shape[1], params)
    if starts.size == 0:
        raise ValueError(f"the recording is shorter than one {window_s}-s window")
    length = window_s * 200
    x = np.stack([prepared.data[:, s:s + length].reshape(len(prepared.names), window_s, 200) for s in starts])
    return Windows(x, prepared, starts / 200.0)


def load(path: str, *, window_s: int | None = None, notch: float | None = None, task: str | None = None,
         **download) -> Predictor:
    """Loads a fine-tuning workdir, a ``model.npz`` of any stage, a Hub folder written by
    ``hub.save_pretrained`` (or its repository id ``owner/name``; ``download``:
    ``huggingface_hub.snapshot_download`` options such as ``local_files_only=True``), or
    official PyTorch weights.

    For a workdir or a Hub folder, the window length and task come from its ``config.json``.
    Official ``.pth``/``.npz`` files are tried as a fine-tuned model, then as ``labram-base.pth``
    (embeddings only).
    """
    path = str(path)
    facts, centring = {}, None
    if hub.is_pretrained_dir(path) or (not os.path.exists(path) and path.count("/") == 1):
        kind, model, variables, facts = hub.load_variables(path, **download)
        centring = facts["model"].get("subject_centring")
    else:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                run = json.load(f)
            facts = {"window_s": run["data"]["max_windows"], "task": run.get("finetune", {}).get("task")}
        path = model_file.resolve(path)
        try:
            kind, model, variables = model_file.load(path)
            centring = model_file.centring_of(path)
        except model_file.ModelFileError:
            try:
                model, variables = convert.load_official(path, "finetune")
                kind = "finetune"
            except convert.ConversionError:
                model, variables = convert.load_official(path, "pretrain")
                kind = "pretrain"
    if kind == "tokenizer":
        raise ValueError(f"{path} is a tokenizer; load a pretrained or fine-tuned model")
    window_s = window_s or facts.get("window_s")
    task = task or facts.get("task")
    if kind == "finetune" and task is None:
        task = "binary" if model.num_outputs == 1 else "multiclass"
    return Predictor(kind, model, variables, task, window_s or 4, 50.0 if notch is None else notch,
                     subject_centring=centring)
