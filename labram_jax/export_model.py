"""A fine-tuned model as a deployable artefact: a serialized ``jax.export`` program (StableHLO)
with its weights, the preprocessing it expects, and a runner that needs only jax and numpy.

    python -m labram_jax.export_model WORKDIR OUT [--platforms cpu cuda tpu]

``OUT/`` then holds:

- ``model.jax``: the exported function ``predict(x, channel_ids) -> scores`` with the weights
  inside; ``x`` is ``[batch, channels, windows, 200]`` float32 (any batch, channel count and
  window count up to 16) in units of 100 uV at 200 Hz, ``channel_ids`` ``[channels]`` int32
  spatial-table rows; ``scores`` are probabilities (binary ``[batch]``, multi-class
  ``[batch, K]``) or values (regression ``[batch]``). Lowered for every ``--platforms`` entry.
- ``preprocessing.json``: what the inputs must be: the channels the model was fine-tuned on
  (vocabulary names and rows), sample rate, units, window length, band-pass and notch, the
  task and its labels, and how to make windows from a recording (the same steps as
  ``labram_jax.preprocess``).
- ``predict.py``: ``python predict.py windows.npy scores.npy`` (or ``import predict;
  predict.predict(x, rows)``) with jax and numpy alone (no flax, optax, orbax, grain or
  labram_jax).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

from labram_jax import api, channels, data_spec, model_file
from labram_jax.models import config as model_config
from labram_jax.tasks import finetune

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

RUNNER = '''"""Runs the exported LaBraM model with jax and numpy alone (written by labram_jax.export_model).

    python predict.py windows.npy scores.npy [channel_rows.npy]

windows: [batch, channels, windows, 200] float32 in units of 100 uV at 200 Hz (see
preprocessing.json); channel_rows: [channels] int32 spatial-table rows (default: the
channels of preprocessing.json, in that order).
"""
import json
import pathlib
import sys

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SPEC = json.loads((HERE / "preprocessing.json").read_text())
EXPORTED = jax.export.deserialize(bytearray((HERE / "model.jax").read_bytes()))


def predict(x, channel_rows=None):
    """Scores of windows x [batch, channels, windows, 200] (see preprocessing.json)."""
    rows = np.asarray(SPEC["channel_rows"] if channel_rows is None else channel_rows, np.int32)
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] != rows.shape[0] or x.shape[3] != 200:
        raise ValueError(f"windows must be [batch, {rows.shape[0]} channels, windows, 200], got {x.shape}")
    return np.asarray(EXPORTED.call(x, rows))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    rows = np.load(sys.argv[3], allow_pickle=False) if len(sys.argv) == 4 else None
    np.save(sys.argv[2], predict(np.load(sys.argv[1], allow_pickle=False), rows))
'''


def export(predictor: api.Predictor, platforms: tuple[str, ...] = ("cpu",)) -> jax.export.Exported:
    """The predictor's ``predict`` as an exported program over symbolic batch, channel and
    window counts, the weights as constants."""
    if predictor.kind != "finetune":
        raise ValueError("only a fine-tuned model (with a task head) is exported; this is a "
                         f"{predictor.kind} model")
    variables = predictor.variables
    task = predictor.task
    # Portable attention, LayerNorm, linear layers and MLPs: the CPU kernels are custom calls that
    # jax.export cannot serialize, and the artefact may run on other platforms than this one.
    model = predictor.model.clone(cfg=predictor.model.cfg.replace(attention="explicit", layer_norm="xla",
                                                                  linear="xla", mlp="layers"))

    def predict(x, channel_ids):
        logits = model.apply(variables, x, channel_ids)
        return finetune.scores(task, logits)

    b, n, a = jax.export.symbolic_shape("b, n, a", constraints=(f"a <= {model_config.NUM_TIME_ROWS}",))
    args = (jax.ShapeDtypeStruct((b, n, a, model_config.PATCH_SIZE), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32))
    return jax.export.export(jax.jit(predict), platforms=platforms)(*args)


def preprocessing(workdir: str, predictor: api.Predictor) -> dict:
    """The inputs the model expects, from its fine-tuning run (config and training manifest)."""
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    names, rows, labels, band, notch = [], [], [], (0.1, 75.0), predictor.notch
    manifests = [m for pattern in data_spec.DataSpec.parse(config["data"]["train"]).manifests
                 for m in data_spec.expand(pattern)]
    if manifests:
        manifest = json.loads(pathlib.Path(manifests[0]).read_text())
        params = manifest.get("parameters", {})
        band, notch = (params.get("l_freq", 0.1), params.get("h_freq", 75.0)), params.get("notch", notch)
        labels = manifest.get("labels", {}).get("names", [])
        kept = next((f["channels_kept"] for f in manifest["files"] if f.get("channels_kept")), [])
        names, rows = list(kept), [int(channels.spatial_row(n)) for n in kept]
    return {"sample_rate_hz": 200, "units": "100 uV (volts x 1e4)", "window_s": predictor.window_s,
            "patch_samples": model_config.PATCH_SIZE, "band_pass_hz": list(band), "notch_hz": notch,
            "channels": names, "channel_rows": rows, "task": predictor.task, "labels": labels,
            "scores": {"binary": "P(label 1) per window", "multiclass": "class probabilities per window",
                       "regression": "value per window"}[predictor.task],
            "how": "EEG channels mapped onto these vocabulary names (other channel sets work too: pass their "
                   "spatial-table rows), band-pass, notch (and harmonics), resample to 200 Hz, volts x 1e4, "
                   "non-overlapping windows of window_s seconds reshaped to [channels, window_s, 200]"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labram_jax.export_model", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("workdir", help="a fine-tuning run's workdir (config.json + model.npz)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--platforms", nargs="+", default=["cpu"], choices=PLATFORMS,
                        help="platforms to lower for (default cpu; several make one multi-platform program)")
    args = parser.parse_args(argv)
    try:
        model_file.resolve(args.workdir)
        predictor = api.load(args.workdir)
        exported = export(predictor, tuple(args.platforms))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.jax").write_bytes(exported.serialize())
    (out / "preprocessing.json").write_text(json.dumps(preprocessing(args.workdir, predictor), indent=1))
    (out / "predict.py").write_text(RUNNER)
    size = os.path.getsize(out / "model.jax")
    print(f"wrote {out}: model.jax ({size / 2**20:.1f} MiB, platforms {', '.join(exported.platforms)}), "
          "preprocessing.json, predict.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
