"""Parity with the original implementation: every output tensor of every reference file.

Files are discovered in $LABRAM_REFERENCE_DIR (default ../shared/reference) and the
model is chosen by file-name prefix; sizes come from the tensor shapes through
``convert.load_official``, so fixtures of other sizes, montages, code dims, codebook
sizes and class counts pass unchanged.
"""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from labram_jax import channels, convert
from labram_jax.models import tokenizer as tokenizer_lib

TOL = 1e-4
_DIR = pathlib.Path(os.environ.get("LABRAM_REFERENCE_DIR",
                                   pathlib.Path(__file__).resolve().parents[3] / "shared" / "reference"))
KINDS = {"labram_finetune": "finetune", "labram_pretrain": "pretrain", "vqnsp": "tokenizer"}


def _files(prefix):
    return sorted(_DIR.glob(f"{prefix}*.npz")) if _DIR.is_dir() else []


def test_reference_files_present():
    found = [p.name for prefix in KINDS for p in _files(prefix)]
    assert len(found) >= 3, f"expected reference files in {_DIR}, found {found}"


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


class Checker:
    """Collects per-tensor errors so a failure reports all of them."""

    def __init__(self, name):
        self.name, self.errors, self.compared = name, {}, []

    def close(self, key, ours, ref):
        self.errors[key] = rel_err(ours, ref)
        self.compared.append(key)

    def equal(self, key, ours, ref):
        ours, ref = np.asarray(ours), np.asarray(ref)
        self.errors[key] = float((ours != ref).mean()) if ours.shape == ref.shape else 1.0
        self.compared.append(key)

    def verify(self):
        assert self.compared, f"{self.name}: no output tensor compared"
        bad = {k: v for k, v in self.errors.items() if not v <= TOL}
        report = ", ".join(f"{k}={v:.2e}" for k, v in self.errors.items())
        print(f"{self.name}: {report}")
        assert not bad, f"{self.name}: above {TOL}: {bad} (all: {report})"


def _channel_ids(data, group=""):
    rows = data[f"{group}input_chans"]
    if f"{group}ch_names" in data.files:  # our name mapping must give the same rows
        mapped = channels.map_channels([str(n) for n in data[f"{group}ch_names"]])
        assert not mapped.dropped, mapped.dropped
        np.testing.assert_array_equal(channels.input_rows(mapped.names), rows)
    return rows[1:]


@pytest.mark.parametrize("path", _files("labram_finetune"), ids=lambda p: p.name)
def test_finetune_parity(path):
    data = np.load(path)
    model, variables = convert.load_official(path, "finetune")
    check = Checker(path.name)
    groups = sorted({k.split("/")[0] for k in data.files if k.endswith("/x")})
    for g in groups:
        x, ch = data[f"{g}/x"], _channel_ids(data, f"{g}/")
        logits, state = model.apply(variables, x, ch, mutable=["intermediates"])
        inter = state["intermediates"]["encoder"]
        emb = model.apply(variables, x, ch, method=model.embed)
        outputs = {"logits": logits, "patch_embed": inter["patch_embed_out"][0],
                   "block0_in": inter["block0_in"][0], "block0_out": inter["block0_out"][0],
                   "all_tokens": emb["tokens"]}
        for name, ours in outputs.items():
            if f"{g}/{name}" in data.files:
                check.close(f"{g}/{name}", ours, data[f"{g}/{name}"])
    check.verify()


@pytest.mark.parametrize("path", _files("labram_pretrain"), ids=lambda p: p.name)
def test_pretrain_parity(path):
    data = np.load(path)
    model, variables = convert.load_official(path, "pretrain")
    x, ch, mask = data["x"], _channel_ids(data), data["bool_masked_pos"]
    hidden = model.apply(variables, x, ch, mask)
    hidden_sym = model.apply(variables, x, ch, ~mask)
    logits = model.apply(variables, hidden[mask], method=model.logits)
    logits_sym = model.apply(variables, hidden_sym[~mask], method=model.logits)
    check = Checker(path.name)
    check.close("logits_masked", logits, data["logits_masked"])
    check.close("logits_sym", logits_sym, data["logits_sym"])
    if "target_tokens" in data.files and "loss" in data.files:
        t = data["target_tokens"]
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, t[mask]).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits_sym, t[~mask]).mean())
        check.close("loss", loss, data["loss"])
    check.verify()


_LOSS_NAMES = {"quant_loss": "commitment_loss", "rec_angle_loss": "phase_loss",
               "rec_loss": "amplitude_loss", "total_loss": "loss"}


@pytest.mark.parametrize("path", _files("vqnsp"), ids=lambda p: p.name)
def test_tokenizer_parity(path):
    data = np.load(path)
    model, variables = convert.load_official(path, "tokenizer")
    x, ch = data["x"], _channel_ids(data)
    b, n, a, _ = x.shape
    out, state = model.apply(variables, x, ch, mutable=["intermediates"])
    inter = state["intermediates"]
    amp, phase = tokenizer_lib.fourier_targets(x)
    check = Checker(path.name)
    ours = {"amp_target": amp, "phase_target": phase,
            "encoder_patch_tokens": inter["encoder_patch_tokens"][0],
            "to_quantizer": inter["to_quantizer"][0],
            # reference layout: [B, code_dim, N, A]
            "quantized": jnp.transpose(out["quantized"].reshape(b, n, a, -1), (0, 3, 1, 2)),
            "rec_amp": out["rec_amplitude"], "rec_phase": out["rec_phase"], "loss": out["loss"]}
    for name, value in ours.items():
        if name in data.files:
            check.close(name, value, data[name])
    if "tokens" in data.files:
        check.equal("tokens", out["codes"], data["tokens"])
    if "loss_terms" in data.files:
        for name, ref in zip(data["loss_term_names"], data["loss_terms"]):
            check.close(str(name), out[_LOSS_NAMES[str(name).split("/")[-1]]], ref)
    if "ema/codebook_after" in data.files:
        ema_model = model.clone(cfg=model.cfg.replace(ema_decay=float(data["ema/decay"])))
        _, updated = ema_model.apply(variables, data["ema/x"], ch, train=True, update_codebook=True,
                                     mutable=["codebook"])
        check.close("ema/codebook_after", updated["codebook"]["quantizer"]["embedding"],
                    data["ema/codebook_after"])
    check.verify()
