"""Official LaBraM PyTorch weights <-> labram_jax Flax variables.

``load_official(source, kind)`` reads a state dict (a ``.pth`` file, an ``.npz`` whose
keys may carry an ``sd/`` prefix, or a mapping name -> array), infers the model's sizes
from the tensor shapes, and returns ``(module, variables)``. ``to_official(kind,
variables)`` goes back to an official-style state dict; the round trip is exact.
Tensors the reference stores but never uses in its forward pass (``student.lm_head``,
``projection_head``, the tokenizer's ``embed_avg``) travel in the variable collection
``reference_unused`` so that nothing is lost.

Command line::

    python -m labram_jax.convert import labram-base.pth --kind pretrain --out base.npz
    python -m labram_jax.convert export base.npz --out labram-base-roundtrip.pth
    python -m labram_jax.convert inspect vqnsp.pth --kind tokenizer
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle  # only for the exception type raised by torch's weights-only loader
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from labram_jax import model_file
from labram_jax.models import config as config_lib
from labram_jax.models import tokenizer as tokenizer_lib
from labram_jax.models import transformer

KINDS = model_file.KINDS
UNUSED = model_file.UNUSED
# Attention heads cannot be read from the shapes of a model without q/k norm (the
# tokenizer): the published widths (and our tiny preset) use these, any other width
# falls back to 20 per head.
HEADS_BY_WIDTH = {100: 4, 200: 10, 400: 16, 800: 16}
_DEFAULT_HEAD_DIM = 20


class ConversionError(ValueError):
    """A state dict that does not fit the model: the message lists every problem."""


# ----------------------------------------------------------------------------- reading


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flat name -> float32/int NumPy array dict from a .pth, .safetensors, .npz or mapping."""
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such checkpoint file: {path}")
        if path.endswith(".safetensors"):  # e.g. a Hub repository's model.safetensors
            sd = safetensors.numpy.load_file(path)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.files)
                if any(k.startswith("sd/") for k in keys):
                    sd = {k[3:]: data[k] for k in keys if k.startswith("sd/")}
                else:
                    sd = {k: data[k] for k in keys}
        else:
            sd = _read_torch(path)
    for wrapper in ("model", "state_dict", "module"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
    sd = {re.sub(r"^module\.", "", k): _to_numpy(v) for k, v in sd.items()}
    return sd


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch  # optional dependency: pip install 'labram_jax[torch]'
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch: pip install 'labram_jax[torch]' "
                          "(or convert it to .npz elsewhere)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path} needs unpickling of arbitrary Python objects, which can run code; it is "
            "refused. Re-save only its tensors (torch.save(ckpt['model'], 'weights.pth')) in a "
            f"trusted environment and convert that. ({str(err).splitlines()[0]})") from None


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


# ----------------------------------------------------------------------------- inference


def _block_count(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if ids != set(range(len(ids))):
        raise ConversionError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _need(sd, key):
    if key not in sd:
        raise ConversionError(f"missing key {key!r}, which the model size is read from")
    return sd[key]


def infer_transformer(sd: Mapping[str, np.ndarray], prefix: str, num_heads: int | None = None,
                      layer_scale_default: float = 0.1) -> config_lib.TransformerConfig:
    """Reads a neural transformer's sizes from the shapes of its tensors under ``prefix``."""
    spatial = _need(sd, prefix + "pos_embed")
    d = spatial.shape[-1]
    depth = _block_count(sd, prefix)
    b0 = prefix + "blocks.0."
    if depth == 0:
        raise ConversionError(f"no transformer blocks under {prefix!r}")
    if b0 + "attn.q_norm.weight" in sd:
        heads = d // sd[b0 + "attn.q_norm.weight"].shape[0]
    else:
        heads = num_heads or HEADS_BY_WIDTH.get(d) or d // _DEFAULT_HEAD_DIM
    if num_heads and num_heads != heads:
        raise ConversionError(f"num_heads={num_heads} contradicts the q_norm size (head_dim {d // heads})")
    conv = prefix + "patch_embed.conv1.weight"
    temporal = sd[conv].shape[0] if conv in sd else 0
    in_dim = 0 if temporal else _need(sd, prefix + "patch_embed.proj.weight").shape[1]
    return config_lib.TransformerConfig(
        embed_dim=d, depth=depth, num_heads=heads,
        mlp_ratio=_need(sd, b0 + "mlp.fc1.weight").shape[0] / d,
        temporal_channels=temporal, in_dim=in_dim,
        qk_norm=b0 + "attn.q_norm.weight" in sd,
        qkv_bias=b0 + "attn.q_bias" in sd,
        layer_scale_init=layer_scale_default if b0 + "gamma_1" in sd else None,
        num_spatial_rows=spatial.shape[1], num_time_rows=_need(sd, prefix + "time_embed").shape[1])


def build_model(kind: str, sd: Mapping[str, np.ndarray], num_heads: int | None = None) -> nn.Module:
    """The Flax module whose sizes match the official state dict ``sd``."""
    if kind == "finetune":  # without head.*: an encoder for embeddings (num_outputs 0)
        cfg = infer_transformer(sd, "", num_heads)
        return transformer.LaBraM(cfg, num_outputs=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    if kind == "pretrain":
        cfg = infer_transformer(sd, "student.", num_heads)
        return transformer.LaBraMPretrain(cfg, vocab_size=_need(sd, "lm_head.weight").shape[0])
    if kind == "tokenizer":
        enc = infer_transformer(sd, "encoder.", num_heads, layer_scale_default=None)
        dec = infer_transformer(sd, "decoder.", num_heads or enc.num_heads, layer_scale_default=None)
        k, d = _need(sd, "quantize.embedding.weight").shape
        return tokenizer_lib.VQNSP(config_lib.TokenizerConfig(encoder=enc, decoder=dec, codebook_size=k, code_dim=d))
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


# ----------------------------------------------------------------------------- key rules


@dataclasses.dataclass(frozen=True)
class _Rule:
    official: str
    path: tuple[str, ...]  # (collection, module..., name)
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _ident(x):
    return x


def _linear(official, path):
    return [_Rule(official + ".weight", path + ("kernel",), lambda w: w.T, lambda k: k.T),
            _Rule(official + ".bias", path + ("bias",), _ident, _ident)]


def _norm(official, path):
    return [_Rule(official + ".weight", path + ("scale",), _ident, _ident),
            _Rule(official + ".bias", path + ("bias",), _ident, _ident)]


def _squeeze_lead(w):
    return w.reshape(w.shape[-1])


def _transformer_rules(cfg: config_lib.TransformerConfig, prefix: str, path: tuple[str, ...],
                       mask_token: bool) -> list[_Rule]:
    d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    rules = [
        _Rule(prefix + "cls_token", path + ("cls_token",), _squeeze_lead, lambda v: v.reshape(1, 1, -1)),
        _Rule(prefix + "pos_embed", path + ("spatial_embed",), lambda w: w[0], lambda v: v[None]),
        _Rule(prefix + "time_embed", path + ("time_embed",), lambda w: w[0], lambda v: v[None]),
    ]
    if mask_token:
        rules.append(_Rule(prefix + "mask_token", path + ("mask_token",), _squeeze_lead,
                           lambda v: v.reshape(1, 1, -1)))
    if cfg.temporal_channels:
        pe = path + ("patch_embed",)
        for i in (1, 2, 3):
            rules += [
                # torch (out, in, 1, k) <-> flax (k, in, out)
                _Rule(f"{prefix}patch_embed.conv{i}.weight", pe + (f"conv{i}", "kernel"),
                      lambda w: w[:, :, 0, :].transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0)[:, :, None, :]),
                _Rule(f"{prefix}patch_embed.conv{i}.bias", pe + (f"conv{i}", "bias"), _ident, _ident),
                _Rule(f"{prefix}patch_embed.norm{i}.weight", pe + (f"norm{i}_scale",), _ident, _ident),
                _Rule(f"{prefix}patch_embed.norm{i}.bias", pe + (f"norm{i}_bias",), _ident, _ident),
            ]
    else:  # 1x1 conv (out, in, 1, 1) <-> dense (in, out)
        rules += [_Rule(prefix + "patch_embed.proj.weight", path + ("patch_embed", "kernel"),
                        lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None]),
                  _Rule(prefix + "patch_embed.proj.bias", path + ("patch_embed", "bias"), _ident, _ident)]
    for i in range(cfg.depth):
        o, p = f"{prefix}blocks.{i}.", path + (f"blocks_{i}",)
        rules += _norm(o + "norm1", p + ("norm1",)) + _norm(o + "norm2", p + ("norm2",))
        rules += [
            _Rule(o + "attn.qkv.weight", p + ("attn", "qkv"),
                  lambda w, d=d, h=h, hd=hd: w.T.reshape(d, 3, h, hd), lambda k, d=d: k.reshape(d, -1).T),
            _Rule(o + "attn.proj.weight", p + ("attn", "proj"),
                  lambda w, d=d, h=h, hd=hd: w.T.reshape(h, hd, d), lambda k, d=d: k.reshape(-1, d).T),
            _Rule(o + "attn.proj.bias", p + ("attn", "proj_bias"), _ident, _ident),
        ]
        rules += _linear(o + "mlp.fc1", p + ("mlp", "fc1")) + _linear(o + "mlp.fc2", p + ("mlp", "fc2"))
        if cfg.qkv_bias:
            rules += [_Rule(o + f"attn.{n}_bias", p + ("attn", f"{n}_bias"),
                            lambda w, h=h, hd=hd: w.reshape(h, hd), lambda v: v.reshape(-1)) for n in "qv"]
        if cfg.qk_norm:
            rules += _norm(o + "attn.q_norm", p + ("attn", "q_norm")) + _norm(o + "attn.k_norm", p + ("attn", "k_norm"))
        if cfg.layer_scale_init is not None:
            rules += [_Rule(o + f"gamma_{j}", p + (f"gamma_{j}",), _ident, _ident) for j in (1, 2)]
    return rules


def _task_head(official, path):
    return _linear(official + ".0", path + ("dense_0",)) + _linear(official + ".2", path + ("dense_1",))


def _rules(kind: str, model: nn.Module) -> list[_Rule]:
    P = ("params",)
    if kind == "finetune":
        return (_transformer_rules(model.cfg, "", P + ("encoder",), mask_token=False)
                + _norm("fc_norm", P + ("fc_norm",)) + (_linear("head", P + ("head",)) if model.num_outputs else []))
    if kind == "pretrain":
        return (_transformer_rules(model.cfg, "student.", P + ("encoder",), mask_token=True)
                + _norm("student.norm", P + ("norm",)) + _linear("lm_head", P + ("lm_head",)))
    cfg, C = model.cfg, ("codebook", "quantizer")
    return (_transformer_rules(cfg.encoder, "encoder.", P + ("encoder",), mask_token=False)
            + _norm("encoder.fc_norm", P + ("encoder_norm",))
            + _transformer_rules(cfg.decoder, "decoder.", P + ("decoder",), mask_token=False)
            + _norm("decoder.fc_norm", P + ("decoder_norm",))
            + _task_head("encode_task_layer", P + ("encode_task_layer",))
            + _task_head("decode_task_layer", P + ("amplitude_head",))
            + _task_head("decode_task_layer_angle", P + ("phase_head",))
            + [_Rule("quantize.embedding.weight", C + ("embedding",), _ident, _ident),
               _Rule("quantize.cluster_size", C + ("cluster_size",), _ident, _ident),
               _Rule("quantize.embedding.initted", C + ("initted",), lambda v: v.reshape(()),
                     lambda v: v.reshape(1))])


# Stored by the reference but unused by its forward pass: kept verbatim.
_UNUSED_PATTERNS = {
    "finetune": (),
    "pretrain": (r"student\.lm_head\.(weight|bias)", r"projection_head\.0\.(weight|bias)"),
    "tokenizer": (r"quantize\.embedding\.cluster_size", r"quantize\.embedding\.embed_avg"),
}


def _abstract_variables(model: nn.Module, kind: str):
    x = jnp.zeros((1, 1, 1, config_lib.PATCH_SIZE), jnp.float32)
    ch = jnp.ones((1,), jnp.int32)
    if kind == "pretrain":  # init through lm_head too, which __call__ does not reach
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, ch, jnp.zeros((1, 1), bool),
                                                   method=transformer.LaBraMPretrain.logits_of))
    else:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, ch))
    return nn.unbox(shapes)


# ----------------------------------------------------------------------------- public API


def load_official(source: str | os.PathLike | Mapping[str, Any], kind: str,
                  num_heads: int | None = None) -> tuple[nn.Module, dict]:
    """Builds the module that matches an official state dict and its Flax variables.

    Args:
      source: a ``.pth`` file (read with ``torch.load(weights_only=True)``), an ``.npz``
        (keys optionally prefixed ``sd/``) or a mapping official name -> array.
      kind: ``finetune`` (encoder + fc_norm + head), ``pretrain`` (``labram-base.pth``)
        or ``tokenizer`` (``vqnsp.pth``).
      num_heads: only for models whose head count the shapes do not show (the
        tokenizer has no q/k norm); default: 10 / 16 / 16 for widths 200 / 400 / 800.
    Returns:
      ``(module, variables)``: apply with ``module.apply(variables, x, channel_ids, ...)``.
    Raises:
      ConversionError: listing every unknown, missing or mis-shaped key.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    sd = read_state_dict(source)
    model = build_model(kind, sd, num_heads)
    rules = _rules(kind, model)
    expected = _abstract_variables(model, kind)
    variables: dict = {}
    problems: list[str] = []
    for rule in rules:
        if rule.official not in sd:
            problems.append(f"missing: {rule.official}")
            continue
        value = sd[rule.official]
        want = _get(expected, rule.path).shape
        try:
            converted = np.asarray(rule.to_flax(value))
        except ValueError:
            converted = None
        if converted is None or converted.shape != tuple(want):
            problems.append(f"mis-shaped: {rule.official} has {tuple(value.shape)}, "
                            f"expected the equivalent of flax {tuple(want)}")
            continue
        _set(variables, rule.path, converted.astype(_get(expected, rule.path).dtype))
    known = {r.official for r in rules}
    unused_patterns = [re.compile(p) for p in _UNUSED_PATTERNS[kind]]
    unused = {k: v for k, v in sd.items() if k not in known and any(p.fullmatch(k) for p in unused_patterns)}
    unknown = sorted(set(sd) - known - set(unused))
    problems += [f"unknown: {k} {tuple(sd[k].shape)}" for k in unknown]
    if problems:
        raise ConversionError(f"the {kind} state dict does not fit the inferred model "
                              f"({model_file.describe(model)}):\n  " + "\n  ".join(problems))
    if unused:
        variables[UNUSED] = unused
    return model, variables


def to_official(kind: str, model: nn.Module, variables: Mapping) -> dict[str, np.ndarray]:
    """Official-style state dict (PyTorch names and layouts, float32 NumPy arrays).

    Tensors the reference keeps but never uses are taken from ``reference_unused`` when
    present, else synthesised (an unused lm_head copy, an identity projection head,
    the tokenizer's ``embed_avg`` = codebook) so that the reference loads the dict strictly.
    """
    changed = getattr(model.cfg, "encoder", model.cfg).non_reference_inputs()
    if changed:
        raise ConversionError("this model reads its signal with " + ", ".join(f"model.{k}={v!r}" for k, v in changed.items())
                              + ", which the reference implementation does not have: only models trained with "
                              + ", ".join(f"{k}={config_lib.REFERENCE_INPUTS[k]!r}" for k in changed)
                              + " convert to its format; use this model through labram_jax (its model.npz) instead")
    if getattr(model.cfg, "head_pooling", "mean") != "mean":
        raise ConversionError(f"this model's head reads model.head_pooling={model.cfg.head_pooling!r}, which the "
                              "reference implementation does not have: only mean-pooled heads convert to its format; "
                              "use this model through labram_jax (its model.npz) instead")
    variables = flax.core.unfreeze(nn.unbox(variables)) if hasattr(variables, "unfreeze") else nn.unbox(variables)
    sd = {}
    for rule in _rules(kind, model):
        sd[rule.official] = np.asarray(rule.to_torch(np.asarray(_get(variables, rule.path))))
    unused = dict(variables.get(UNUSED, {}))
    if kind == "pretrain":
        d = model.cfg.embed_dim
        unused.setdefault("student.lm_head.weight", sd["lm_head.weight"])
        unused.setdefault("student.lm_head.bias", sd["lm_head.bias"])
        unused.setdefault("projection_head.0.weight", np.eye(d, dtype=np.float32))
        unused.setdefault("projection_head.0.bias", np.zeros((d,), np.float32))
    elif kind == "tokenizer":
        unused.setdefault("quantize.embedding.cluster_size", sd["quantize.cluster_size"])
        unused.setdefault("quantize.embedding.embed_avg", sd["quantize.embedding.weight"])
    sd.update({k: np.asarray(v) for k, v in unused.items()})
    return sd


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- braindecode

# braindecode's Labram (braindecode.models.Labram; what its from_pretrained gives) holds the
# tensors of the original's fine-tuning model under other names: (original, braindecode).
BRAINDECODE_NAMES = (("pos_embed", "position_embedding"), ("time_embed", "temporal_embedding"),
                     ("patch_embed.", "patch_embed.temporal_conv."), (".mlp.fc1.", ".mlp.0."),
                     (".mlp.fc2.", ".mlp.2."), ("head.", "final_layer."))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if key.startswith(old) or (old.startswith(".") and old in key):
            return key.replace(old, new, 1)
    return key


def from_braindecode(source: str | os.PathLike | Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """``(module, variables)`` of a braindecode ``Labram`` state dict (a mapping, ``.pth`` or
    ``.safetensors``-read dict): a fine-tuning model, or an encoder without head
    (``num_outputs`` 0) when the state dict has none.

    Differences from the original that matter (docs/README "braindecode"): the time table has
    ``n_times // patch_size + 1`` rows instead of 16 (kept: the imported model takes at most
    that many windows); ``use_mean_pooling=False`` (braindecode's default) classifies the cls
    token after a LayerNorm ``norm`` over all tokens, where the original (and labram_jax) pools
    the patch tokens through ``fc_norm``, so such a head is refused; ``qkv_bias=True`` adds q/v
    biases the original fine-tuning model does not have (refused likewise).
    """
    sd = read_state_dict(source)
    if "norm.weight" in sd and "fc_norm.weight" not in sd:
        raise ConversionError("this braindecode Labram pools the cls token (use_mean_pooling=False: a LayerNorm "
                              "'norm' over all tokens, then the cls token), which neither the original LaBraM "
                              "fine-tuning model nor labram_jax has; create it with use_mean_pooling=True (the "
                              "original's pooling) to convert it")
    if any(k.endswith("attn.q_bias") for k in sd):
        raise ConversionError("this braindecode Labram has q/v biases (qkv_bias=True), which the original LaBraM "
                              "fine-tuning model has not; only qkv_bias=False models convert")
    inverse = tuple((new, old) for old, new in BRAINDECODE_NAMES)
    official = {_rename(k, inverse): v for k, v in sd.items() if not k.startswith("final_layer.")
                or sd[k].size}  # an Identity head (n_outputs=0) has no tensors
    return load_official(official, "finetune")


def to_braindecode(model: nn.Module, variables: Mapping, n_times: int) -> dict[str, np.ndarray]:
    """A braindecode ``Labram`` state dict of a fine-tuned (or headless) model, for
    ``Labram(n_times=n_times, n_outputs=..., use_mean_pooling=True, ...)``: the time table cut
    to its ``n_times // 200 + 1`` rows."""
    rows = n_times // config_lib.PATCH_SIZE + 1
    sd = to_official("finetune", model, variables)
    if sd["time_embed"].shape[1] < rows:
        raise ConversionError(f"braindecode's Labram with n_times={n_times} has {rows} time rows, this model "
                              f"{sd['time_embed'].shape[1]}: use n_times <= {(sd['time_embed'].shape[1] - 1) * 200}")
    sd["time_embed"] = sd["time_embed"][:, :rows]
    return {_rename(k, BRAINDECODE_NAMES): v for k, v in sd.items()}


def save_official(path: str, sd: Mapping[str, np.ndarray]) -> None:
    """Writes an official-style state dict: ``.pth`` (needs torch, under ``model``) or ``.npz``."""
    if path.endswith(".npz"):
        np.savez(path, **{f"sd/{k}": v for k, v in sd.items()})
        return
    try:
        import torch
    except ImportError:
        raise ImportError("writing .pth needs PyTorch: pip install 'labram_jax[torch]', "
                          "or write .npz instead") from None
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labram_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official .pth/.npz -> labram_jax variables (.npz)")
    imp.add_argument("source")
    imp.add_argument("--kind", choices=KINDS, required=True)
    imp.add_argument("--out", required=True, help="output .npz of Flax variables")
    imp.add_argument("--num-heads", type=int, default=None)
    exp = sub.add_parser("export", help="labram_jax variables (.npz) -> official .pth or .npz")
    exp.add_argument("source")
    exp.add_argument("--out", required=True, help="output .pth (needs torch) or .npz (keys sd/...)")
    ins = sub.add_parser("inspect", help="print the model inferred from an official checkpoint")
    ins.add_argument("source")
    ins.add_argument("--kind", choices=KINDS, required=True)
    ins.add_argument("--num-heads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command in ("import", "inspect"):
            model, variables = load_official(args.source, args.kind, args.num_heads)
            n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables.get("params", {})))
            print(f"{args.kind}: {model_file.describe(model)}; {n:,} parameters")
            if args.command == "import":
                model_file.save(args.out, args.kind, model, variables)
                print(f"wrote {args.out}")
        else:
            kind, model, variables = model_file.load(args.source)
            save_official(args.out, to_official(kind, model, variables))
            print(f"wrote {args.out} ({kind}: {model_file.describe(model)})")
    except (ConversionError, model_file.ModelFileError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
