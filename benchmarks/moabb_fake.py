"""LaBraM in a MOABB evaluation, next to CSP + LDA, on MOABB's own FakeDataset (no download).

    python -m benchmarks.moabb_fake [--subjects 4] [--steps 200] [--out runs/moabb]

``moabb.evaluations.CrossSubjectEvaluation`` with the ``LeftRightImagery`` paradigm over a
``FakeDataset`` (left vs right hand imagery; its signals are noise, so every pipeline should sit
at chance: the point is that ``LabramClassifier`` runs inside MOABB's machinery like any other
scikit-learn pipeline). Prints the per-subject scores (ROC AUC, MOABB's default for two classes)
and their mean and std per pipeline, and writes them to ``OUT/results.csv``.
Needs ``pip install '.[moabb]'``.
"""

from __future__ import annotations

import argparse
import pathlib

from sklearn.base import BaseEstimator, TransformerMixin


class EpochsData(TransformerMixin, BaseEstimator):
    """``mne.Epochs`` -> their data array [n, channels, samples] (CSP takes arrays)."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X.get_data() if hasattr(X, "get_data") else X


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moabb_fake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=4, help="FakeDataset subjects (each is one test fold)")
    parser.add_argument("--steps", type=int, default=200, help="LabramClassifier fine-tuning steps")
    parser.add_argument("--pretrained", default="", help="a pretrained workdir or model file ('' = from scratch)")
    parser.add_argument("--out", default="runs/moabb")
    args = parser.parse_args(argv)
    try:
        from moabb.datasets.fake import FakeDataset
        from moabb.evaluations import CrossSubjectEvaluation
        from moabb.paradigms import LeftRightImagery
    except ImportError as e:
        raise SystemExit(f"this benchmark needs MOABB ({e}): pip install '.[moabb]'") from e
    import mne
    from mne.decoding import CSP
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.pipeline import make_pipeline

    from labram_jax.estimator import LabramClassifier

    mne.set_log_level("error")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = FakeDataset(event_list=("left_hand", "right_hand"), n_sessions=1, n_runs=1,
                          n_subjects=args.subjects, paradigm="imagery", seed=0)
    evaluation = CrossSubjectEvaluation(paradigm=LeftRightImagery(), datasets=[dataset], overwrite=True,
                                        hdf5_path=str(out / "h5"), return_epochs=True)
    source = "pretrained" if args.pretrained else "from scratch"
    pipelines = {
        f"LaBraM-Tiny ({source}, {args.steps} steps)": make_pipeline(
            LabramClassifier(pretrained=args.pretrained, steps=args.steps)),
        "CSP + LDA": make_pipeline(EpochsData(), CSP(n_components=2), LinearDiscriminantAnalysis()),
    }
    results = evaluation.process(pipelines)
    print(results[["pipeline", "subject", "score", "time"]].to_string())
    print(results.groupby("pipeline")["score"].agg(["mean", "std"]).to_string())
    results.to_csv(out / "results.csv")
    print(f"wrote {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
