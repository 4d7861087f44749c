"""Benchmark: the original PyTorch LaBraM's training steps, for a ratio measured in the same run.

    python -m benchmarks.reference_step --reference PATH [--stages tokenizer pretrain finetune] \
        [--batch 8] [--steps 20] [--warmup 15] [--device cpu|cuda] [--amp] [--json OUT.json] \
        [--profile [--top 25]] [--serve]

``PATH`` is a checkout of the original code (https://github.com/935963004/LaBraM: its
``modeling_vqnsp.py``, ``modeling_pretrain.py``, ``modeling_finetune.py``,
``norm_ema_quantizer.py``). It needs torch and einops (``pip install 'labram_jax[reference]'``);
timm 0.4.12 is used when it imports, otherwise the four timm helpers those files import are
provided here (timm imports torchvision, which a CPU-only torch may lack; see
:func:`install_timm_helpers`).

Each stage runs the step of the original training scripts with the settings of its README
commands, Base size, float32, on random EEG-like batches of the reference's shapes (23 channels;
8 s for the tokenizer and pretraining, 10 s for fine-tuning, as ``benchmarks.train_step``):

- tokenizer: ``vqnsp_encoder_base_decoder_3x200x12`` (8192 x 64 codebook, k-means init in the
  warm-up), ``loss, _ = model(x, input_chans)``, backward, gradient norm, AdamW (0.9, 0.99);
- pretrain: ``labram_base_patch200_1600_8k_vocab`` with a frozen VQ-NSP giving the targets under
  ``no_grad``, 50 % random masking, both cross-entropies, backward, clip 3.0, AdamW (0.9, 0.98);
- finetune: ``labram_base_patch200_200`` (one output, drop path 0.1, absolute positions, no
  relative bias, no q/k/v bias), BCE with logits, backward, gradient norm, AdamW.

``benchmarks.train_step --reference PATH`` runs this in a subprocess with PyTorch held to the
instruction set XLA was held to, and divides.

``--device cuda`` runs the same steps on the GPU (each timed step ends with
``torch.cuda.synchronize()``); ``--amp`` adds what the original's scripts do there: the forward
pass and loss under ``torch.autocast`` in float16, the backward pass through a ``GradScaler``
(scale, unscale before the clip or norm, step, update), as their ``NativeScalerWithGradNormCount``.

``--serve`` (one stage) builds the step, runs the warm-up, then waits on stdin: each line ``N``
runs N more steps and answers one JSON line ``{"step_s": [...]}`` on stdout; an empty line or end
of input ends it. ``benchmarks.train_step --interleave`` alternates blocks of its steps with ours
this way, so both codes meet the same minutes of a machine whose speed drifts.

``--profile`` runs the same steps under ``torch.profiler`` instead and prints where the
reference's time goes, operator by operator (self CPU ms per step, calls per step): the
counterpart of ``benchmarks.profile_step`` for our step, to read the two side by side.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types

import numpy as np

SHAPES = {"finetune": (23, 10), "pretrain": (23, 8), "tokenizer": (23, 8)}


def install_timm_helpers() -> str:
    """Make ``timm.models.layers`` and ``timm.models.registry`` importable for the reference's model
    files. Returns ``"timm <version>"`` when the real timm imports, else ``"helpers"`` after putting
    minimal modules with the four names those files use in ``sys.modules``: ``trunc_normal_``
    (``torch.nn.init.trunc_normal_``), ``to_2tuple``, ``drop_path`` (per-sample stochastic depth:
    keep with probability 1 - p, scale kept samples by 1 / (1 - p)) and ``register_model``
    (returns the function). Only ``drop_path`` runs inside a training step."""
    try:
        import timm.models.layers  # noqa: F401
        import timm.models.registry  # noqa: F401
        import timm
        return f"timm {timm.__version__}"
    except (ImportError, RuntimeError):  # a torchvision built for another torch fails with RuntimeError
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]  # a half-imported timm
    import torch

    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device) < keep
        return x * mask / keep

    layers = types.ModuleType("timm.models.layers")
    layers.trunc_normal_ = lambda tensor, mean=0.0, std=1.0, a=-2.0, b=2.0: torch.nn.init.trunc_normal_(
        tensor, mean, std, a, b)
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.drop_path = drop_path
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})
    return "helpers"


def import_reference(path: str) -> dict:
    """The reference's three model modules, imported from the checkout at ``path``."""
    import os
    missing = [f for f in ("modeling_vqnsp.py", "modeling_pretrain.py", "modeling_finetune.py",
                           "norm_ema_quantizer.py") if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise SystemExit(f"--reference {path}: missing {', '.join(missing)}; pass a checkout of "
                         "https://github.com/935963004/LaBraM")
    sys.path.insert(0, os.path.abspath(path))
    return {name: importlib.import_module(f"modeling_{name}") for name in ("vqnsp", "pretrain", "finetune")}


def random_masking(batch: int, tokens: int, ratio: float, torch, device: str = "cpu"):
    """The reference's per-sample masking: (batch, tokens) bool, ``tokens - int(tokens * (1 - ratio))``
    True per row."""
    keep = int(tokens * (1 - ratio))
    order = torch.argsort(torch.rand(batch, tokens, device=device), dim=1)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    mask[:, :keep] = False
    return torch.gather(mask, 1, torch.argsort(order, dim=1))


def build_step(stage: str, modules: dict, batch: int, torch, device: str = "cpu", amp: bool = False):
    """(step function of one batch, list of batches) for ``stage``, as the original scripts run it,
    on ``device``; ``amp``: float16 autocast and a gradient scaler, as their GPU runs."""
    channels, windows = SHAPES[stage]
    input_chans = list(range(channels + 1))  # cls row first, then the first spatial-table rows
    gen = torch.Generator().manual_seed(0)
    batches = [(0.5 * torch.randn(batch, channels, windows, 200, generator=gen)).to(device) for _ in range(3)]
    if stage == "tokenizer":
        model = modules["vqnsp"].vqnsp_encoder_base_decoder_3x200x12(n_code=8192, code_dim=64,
                                                                     quantize_kmeans_init=True)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.99), weight_decay=1e-4)

        def loss_of(x):  # the original's tokenizer loop passes (batch, channels, samples)
            return model(x.flatten(2), input_chans=input_chans)[0]
        clip = None
    elif stage == "pretrain":
        tokenizer = modules["vqnsp"].vqnsp_encoder_base_decoder_3x200x12(n_code=8192, code_dim=64).eval()
        tokenizer.quantize.embedding.initted.fill_(1.0)  # as loaded from a trained checkpoint
        model = modules["pretrain"].labram_base_patch200_1600_8k_vocab(
            drop_path_rate=0.0, use_shared_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.1,
            vocab_size=8192)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)
        ce = torch.nn.CrossEntropyLoss()

        def loss_of(x):
            mask = random_masking(x.shape[0], channels * windows, 0.5, torch, device)
            with torch.no_grad():
                ids = tokenizer.get_codebook_indices(x, input_chans)
            rec, rec_sym = model(x, input_chans, bool_masked_pos=mask)
            return ce(rec, ids[mask]) + ce(rec_sym, ids[~mask])
        clip = 3.0
    elif stage == "finetune":
        model = modules["finetune"].labram_base_patch200_200(
            num_classes=1, drop_rate=0.0, drop_path_rate=0.1, attn_drop_rate=0.0, use_mean_pooling=True,
            init_scale=0.001, use_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.1, qkv_bias=False)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        bce = torch.nn.BCEWithLogitsLoss()
        labels = [torch.randint(0, 2, (batch,), generator=gen).float().to(device) for _ in batches]
        label_of = {id(x): y for x, y in zip(batches, labels)}

        def loss_of(x):
            return bce(model(x, input_chans=input_chans).squeeze(-1), label_of[id(x)])
        clip = None
    else:
        raise ValueError(f"unknown stage {stage!r}: tokenizer, pretrain or finetune")
    model.to(device)
    if stage == "pretrain":
        tokenizer.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device) if amp else None

    def step(x):
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            loss = loss_of(x)
        opt.zero_grad()
        (scaler.scale(loss) if amp else loss).backward()
        if amp:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        else:  # the original's loss scaler computes the norm for its log either way
            torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]), 2.0)
        if amp:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        return float(loss.detach())
    return step, batches


def bench(stage: str, modules: dict, batch: int, steps: int, warmup: int, device: str = "cpu",
          amp: bool = False) -> dict:
    import torch
    step, batches = build_step(stage, modules, batch, torch, device, amp)
    times = []
    loss = float("nan")
    # Full collections skip the set-up's objects, as benchmarks.train_step has them skip ours (written out
    # here rather than train.set_up_frozen: this process imports torch, not labram_jax and jax).
    gc.freeze()
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = step(batches[i % len(batches)])
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        gc.unfreeze()
    median = statistics.median(times)
    channels, windows = SHAPES[stage]
    return {"stage": stage, "size": "base", "batch": batch, "channels": channels, "windows": windows,
            "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times), "steps": len(times),
            "samples_per_s": batch / median, "loss": loss, "device": device, "amp": amp}


def serve(stage: str, modules: dict, batch: int, warmup: int, lines, out, about: dict) -> int:
    """Warm-up steps, then ``{"ready": stage, **about}`` on ``out``; then for each line ``N`` of
    ``lines`` N timed steps, answered as one JSON line ``{"step_s": [...]}``, until an empty line or
    the end. Returns the steps timed."""
    import torch
    step, batches = build_step(stage, modules, batch, torch)
    done = 0
    gc.freeze()  # as bench
    try:
        for i in range(warmup):
            step(batches[i % len(batches)])
        print(json.dumps({"ready": stage, **about}), file=out, flush=True)
        for line in lines:
            if not line.strip():
                break
            times = []
            for _ in range(int(line)):
                t0 = time.perf_counter()
                step(batches[done % len(batches)])
                times.append(time.perf_counter() - t0)
                done += 1
            print(json.dumps({"step_s": times}), file=out, flush=True)
    finally:
        gc.unfreeze()
    return done


def profile(stage: str, modules: dict, batch: int, steps: int, warmup: int) -> dict:
    """``steps`` steps of ``stage`` under ``torch.profiler`` (after ``warmup`` unprofiled ones):
    every operator's self CPU time and calls, per step, slowest first. Self times do not nest, so
    their sum is the profiled CPU time of a step (the two threads' intra-op work counts once: it
    is the operator's wall time on the calling thread)."""
    import torch
    from torch.profiler import ProfilerActivity
    step, batches = build_step(stage, modules, batch, torch)
    for i in range(warmup):
        step(batches[i % len(batches)])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
    wall = (time.perf_counter() - t0) / steps
    ops = [{"name": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    ops.sort(key=lambda o: -o["self_ms_per_step"])
    channels, windows = SHAPES[stage]
    return {"stage": stage, "size": "base", "batch": batch, "channels": channels, "windows": windows,
            "steps": steps, "profiled_step_s": wall,
            "self_ms_per_step_total": sum(o["self_ms_per_step"] for o in ops), "ops": ops}


def print_profile(row: dict, top: int) -> None:
    print(f"reference {row['stage']} base B={row['batch']} {row['channels']}x{row['windows']}, profiled: "
          f"{1e3 * row['profiled_step_s']:.0f} ms/step, operators' self time {row['self_ms_per_step_total']:.0f} "
          f"ms/step; slowest {top}:", file=sys.stderr)
    print(f"  {'operator':<48} {'ms/step':>9} {'share':>6} {'calls/step':>10}", file=sys.stderr)
    for op in row["ops"][:top]:
        print(f"  {op['name'][:48]:<48} {op['self_ms_per_step']:9.1f} "
              f"{op['self_ms_per_step'] / row['self_ms_per_step_total']:6.1%} {op['calls_per_step']:10.1f}",
              file=sys.stderr)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="checkout of https://github.com/935963004/LaBraM")
    parser.add_argument("--stages", nargs="+", default=["tokenizer", "pretrain", "finetune"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (benchmarks.train_step's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the steps run")
    parser.add_argument("--amp", action="store_true", help="float16 autocast and a gradient scaler, as the "
                        "original's scripts on a GPU (needs --device cuda)")
    parser.add_argument("--json", default="", help="also write the result here")
    parser.add_argument("--profile", action="store_true",
                        help="profile the steps with torch.profiler instead of timing them: where the time goes")
    parser.add_argument("--top", type=int, default=25, help="with --profile: how many operators to print")
    parser.add_argument("--serve", action="store_true",
                        help="one stage, on the CPU: after the warm-up, run N steps for each line N read "
                             "from stdin, answering their times as a JSON line (benchmarks.train_step --interleave)")
    args = parser.parse_args(argv)
    if args.serve and (len(args.stages) != 1 or args.device != "cpu" or args.profile):
        parser.error("--serve takes one stage, on the CPU, without --profile")
    if args.steps < 1 or args.top < 1:
        parser.error("--steps and --top must be at least 1")
    if args.amp and args.device != "cuda":
        parser.error("--amp is the original's GPU recipe: add --device cuda")
    if args.profile and args.device != "cpu":
        parser.error("--profile reads CPU operator times: drop --device cuda")
    missing = [m for m in ("torch", "einops") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the reference needs {' and '.join(missing)}: pip install 'labram_jax[reference]'")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU")
    timm_source = install_timm_helpers()
    modules = import_reference(args.reference)
    torch.manual_seed(0)
    np.random.seed(0)
    result = {"torch": torch.__version__, "torch_isa": torch.backends.cpu.get_cpu_capability(),
              "torch_threads": torch.get_num_threads(), "timm": timm_source, "reference": args.reference,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "amp": args.amp,
              "rows": []}
    if args.serve:
        serve(args.stages[0], modules, args.batch, args.warmup, sys.stdin, sys.stdout,
              {k: v for k, v in result.items() if k != "rows"})
        return result
    for stage in args.stages:
        print(f"... reference {stage} base", file=sys.stderr, flush=True)
        if args.profile:
            result["rows"].append(profile(stage, modules, args.batch, args.steps, args.warmup))
            print_profile(result["rows"][-1], args.top)
        else:
            result["rows"].append(bench(stage, modules, args.batch, args.steps, args.warmup, args.device, args.amp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:  # the tables are printed; every operator is in --json
        return result
    for r in result["rows"]:
        print(f"reference {r['stage']:<9} base B={r['batch']} {r['channels']}x{r['windows']}: "
              f"{1e3 * r['step_s_median']:.0f} ms/step, {r['samples_per_s']:.2f} samples/s", file=sys.stderr)
    print(json.dumps(result))  # read by benchmarks.train_step --reference
    return result


if __name__ == "__main__":
    main()
