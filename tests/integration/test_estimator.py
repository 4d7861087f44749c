"""LaBraM as scikit-learn estimators, inside the tools users run: clone, Pipeline,
cross_val_score on real EEGMAT epochs, and a MOABB evaluation on MOABB's FakeDataset next to
CSP + LDA (no download)."""

import mne
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline

from labram_jax.estimator import LabramClassifier, LabramEmbedder, LinearProbe


@pytest.fixture(scope="module")
def eegmat_epochs(eeg_dir):
    """4-s epochs of the first 24 s of subjects 00-03 (rest = 0, arithmetic = 1), labels, subjects."""
    pieces, labels, subjects = [], [], []
    for subject in ("00", "01", "02", "03"):
        for condition in (1, 2):
            raw = mne.io.read_raw_edf(eeg_dir / "eegmat" / f"Subject{subject}_{condition}.edf", preload=True,
                                      verbose="error").crop(0, 24)
            epochs = mne.make_fixed_length_epochs(raw, duration=4.0, preload=True, verbose="error")
            pieces.append(epochs)
            labels += [condition - 1] * len(epochs)
            subjects += [subject] * len(epochs)
    return mne.concatenate_epochs(pieces, verbose="error"), np.asarray(labels), np.asarray(subjects)


def test_fit_predict_clone_and_cross_validation(eegmat_epochs, tmp_path):
    epochs, y, subjects = eegmat_epochs
    clf = LabramClassifier(steps=16, batch_size=16, seed=1)
    assert clone(clf).get_params() == clf.get_params()
    clf.set_params(lr=3e-4)
    assert clf.get_params()["lr"] == 3e-4
    clf.fit(epochs, y)
    proba = clf.predict_proba(epochs)
    assert proba.shape == (len(y), 2) and np.allclose(proba.sum(1), 1.0)
    assert set(clf.predict(epochs)) <= {0, 1} and clf.transform(epochs).shape == (len(y), 100)
    # arrays with ch_names and sfreq work like the Epochs
    array_clf = LabramClassifier(ch_names=epochs.ch_names, sfreq=epochs.info["sfreq"])
    array_clf.__dict__.update({k: v for k, v in clf.__dict__.items() if k.endswith("_")})
    np.testing.assert_allclose(array_clf.predict_proba(epochs.get_data()), proba, atol=1e-5)
    # cross-validation by subject, as scikit-learn runs it (on arrays, which it can index)
    cv_clf = LabramClassifier(steps=8, batch_size=16, ch_names=epochs.ch_names, sfreq=epochs.info["sfreq"])
    cv_clf.set_params(steps=4)
    scores = cross_val_score(cv_clf, epochs.get_data(), y, groups=subjects, cv=GroupKFold(n_splits=2),
                             scoring="roc_auc")
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    # a linear probe: the embeddings of a fine-tuned model in a Pipeline
    LabramClassifier(steps=4, batch_size=16, workdir=str(tmp_path / "kept")).fit(epochs, y)
    probe = make_pipeline(LabramEmbedder(model=str(tmp_path / "kept" / "finetune")), LogisticRegression())
    assert probe.fit(epochs, y).predict(epochs).shape == y.shape
    # the packaged probe: per-channel embeddings, standardised, regularised LR; the encoder stays as saved
    channel_probe = LinearProbe(str(tmp_path / "kept" / "finetune"), batch_size=16).fit(epochs, y)
    features = channel_probe.embedder_.transform(epochs)
    rows = channel_probe.embedder_.rows_
    assert features.shape == (len(y), len(rows) * 100) and len(rows) > 1
    proba = channel_probe.predict_proba(epochs)
    assert proba.shape == (len(y), 2)
    with pytest.raises(ValueError, match="same montage"):
        channel_probe.embedder_.transform(epochs.copy().drop_channels([epochs.ch_names[0]]))
    # with subject centring the subjects' mean embeddings are removed before the regression
    centred = LinearProbe(str(tmp_path / "kept" / "finetune"), batch_size=16, centring="subject")
    with pytest.raises(ValueError, match="pass groups="):
        centred.fit(epochs, y)
    centred.fit(epochs, y, groups=subjects)
    assert np.abs(centred.predict_proba(epochs, groups=subjects) - proba).max() > 0.02
    one_subject = np.full(len(y), "all")  # one group: centring is a shift the standardisation undoes
    np.testing.assert_allclose(LinearProbe(str(tmp_path / "kept" / "finetune"), batch_size=16, centring="subject")
                               .fit(epochs, y, groups=one_subject).predict_proba(epochs, groups=one_subject),
                               proba, atol=2e-3)  # float64 centred features against float32: the solver's tolerance
    with pytest.raises(ValueError, match="choose one of"):
        LabramEmbedder(model=str(tmp_path / "kept" / "finetune"), pooling="max").fit(epochs)
    with pytest.raises(ValueError, match="at least two classes"):
        LabramClassifier(steps=2).fit(epochs, np.zeros(len(y)))


def test_moabb_evaluation_next_to_csp_lda(tmp_path, monkeypatch):
    pytest.importorskip("moabb", reason="the MOABB evaluation needs moabb (pip install '.[moabb]')")
    from mne.decoding import CSP
    from moabb.datasets.fake import FakeDataset
    from moabb.evaluations import CrossSubjectEvaluation
    from moabb.paradigms import LeftRightImagery
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    monkeypatch.setenv("MNE_DATA", str(tmp_path / "mne_data"))
    dataset = FakeDataset(event_list=("left_hand", "right_hand"), n_sessions=1, n_runs=1, n_subjects=3,
                          paradigm="imagery", duration=30, n_events=20, seed=0)
    evaluation = CrossSubjectEvaluation(paradigm=LeftRightImagery(), datasets=[dataset], overwrite=True,
                                        hdf5_path=str(tmp_path / "moabb"), return_epochs=True, n_jobs=1)
    pipelines = {"LaBraM": make_pipeline(LabramClassifier(steps=4, batch_size=16)),
                 "CSP+LDA": make_pipeline(_EpochsData(), CSP(n_components=2), LinearDiscriminantAnalysis())}
    results = evaluation.process(pipelines)
    assert set(results["pipeline"]) == {"LaBraM", "CSP+LDA"} and len(results) == 6  # 3 subjects x 2
    assert results["score"].between(0, 1).all()


class _EpochsData:
    """Epochs -> their data array, for CSP in a MOABB pipeline that passes epochs."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X.get_data() if isinstance(X, mne.BaseEpochs) else X

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self
