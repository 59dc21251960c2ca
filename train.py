"""
Train a Drifting Model generator, or its feature encoder. One loop, plain python or torchrun.

  --stage gen  the generator (Alg. 1, App. A.6-A.9; official train.py::train_step): per step
               N_c class groups, each with one CFG alpha, N_neg generated, N_pos positive and
               N_unc unconditional real samples; the drift loss on every feature group of the
               frozen MAE. --model picks the preset and its recipe (Tab. 8).
  --stage mae  the feature encoder phi, a ResNet masked autoencoder (App. A.3).
Flag defaults are the recipe of the --model (or of the MAE) on the same command line: `python
train.py --model L2 --help` shows what L2 runs; a flag given overrides it.

    python train.py --stage mae                   # MNIST-5k MAE, CPU: ~1 min (2 cores)
    python train.py --model S4                    # the generator on its features: ~12 min
    python train.py --model S4 --steps 2000 --resume     # continue that run, with its own flags
    torchrun --standalone --nproc_per_node=8 train.py --model L2 --data-path CACHE --mae-ckpt M

Checkpoint: --out/model.safetensors, ONE file (models.save_checkpoint) with the weights, EMA,
optimizer and RNG states, args, and a sha256 per tensor; replaced atomically, written only
when the updated weights give a finite loss. --resume verifies it and takes the run's recorded
flags. Ctrl-C / SIGTERM: the step ends, a checkpoint is written, exit 130 / 143 (twice: at once).
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2). Equation numbers refer to v2.
"""
import argparse
import copy
import datetime
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cache import CACHE_MAKE, LatentCache
from convnext import ConvNeXt_models, convnext_from_hf, pixel_feature_groups
from data import ImageFolder, TensorSampler, draw_groups, mnist5k, split_per_class, subset, take
from encoder import (ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, feature_groups,
                     mae_eval, mae_from_state, mae_picture, patchify)
from fid import fid_from_stats
import field
import field_fast
from models import (DriftDiT, DriftDiT_models, DriftDiTConfig, load_training_checkpoint,
                    read_checkpoint, read_metadata, save_checkpoint, update_ema)
from sample import decode, generate, save_curves, save_grid

# --- Config: one complete row per recipe (Tab. 8 and configs/*/*.yaml; S2/S4/S8 are ours) ---
RECIPES = {
    # App. A.3, configs/mae/latent_ablation_256.yaml: constant lr after a linear warmup
    "mae": dict(data="latents", out="runs/mae", steps=30000, batch=8192, lr=4e-3, warmup=4000,
                weight_decay=0.01, ema=0.9995),
    # --mae-model mnist (CPU, MNIST-5k's 4,500 training digits): the paper's batch 8192 would
    # be ~2 epochs per step and ~20 GB; 400 steps of 64 take ~1 min on 2 cores, and the S4
    # generator trained on the per-pixel 400-step MAE was no worse than on 800 steps (README)
    "mae_mnist": dict(data="mnist5k", out="runs/mae_mnist", steps=400, batch=64, lr=4e-3,
                      warmup=50, weight_decay=0.01, ema=0.99, log_every=50, ckpt_every=200),
    # B/2 sizes with the ablation recipe of Tab. 8 (N_pos: paper B/2 128, official code 64)
    "ablation": dict(data="latents", out="runs/ablation", steps=30000, n_classes_per_step=64,
                     gen_per_label=64, n_pos=64, n_unc=16, lr=2e-4, weight_decay=0.01,
                     warmup=5000, ema=0.999, cfg_power=3.0, no_cfg_frac=0.0),
    "B2": dict(data="latents", out="runs/B2", steps=200000, n_classes_per_step=128,
               gen_per_label=64, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.0, warmup=10000,
               ema=0.999, cfg_power=5.0, no_cfg_frac=0.0),
    "L2": dict(data="latents", out="runs/L2", steps=200000, n_classes_per_step=128,
               gen_per_label=64, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.01, warmup=10000,
               ema=0.999, cfg_power=3.0, no_cfg_frac=0.5),
    "B16": dict(data="images", out="runs/B16", steps=100000, n_classes_per_step=128,
                gen_per_label=64, n_pos=128, n_unc=32, lr=2e-4, weight_decay=0.01, warmup=10000,
                ema=0.999, cfg_power=5.0, no_cfg_frac=0.0, augment=True),
    "L16": dict(data="images", out="runs/L16", steps=100000, n_classes_per_step=128,
                gen_per_label=64, n_pos=128, n_unc=32, lr=4e-4, weight_decay=0.01, warmup=10000,
                ema=0.999, cfg_power=5.0, no_cfg_frac=0.0, augment=True),
    # CPU presets. S4: MNIST-5k in 15 minutes with its MAE (README: the search). EMA 0.99 and
    # lr 2e-3 as a CPU run is 1200 steps, not 30k (the zero-initialized output starts gray and
    # moves ~lr per step toward the black background); all 10 classes in every step (3 per
    # step lost the classes, README); 8 generated but 32 positives per class, as more
    # positives help (Tab. 2) and cost little with --cache-features; field_fast, as the loss
    # is a large share of a CPU step (README). Its MAE (the mnist preset) sees 2x2 patches.
    # NOTE: attract=1.5 (V = 1.5 V+ - V-) departs from the paper's V+ - V- on purpose: far from
    # equilibrium (1200 steps) the extra pull toward the data is worth FID on MNIST (README,
    # the search), while only a = b keeps q = p as the fixed point, which matters for long
    # runs; --attract 1 gives the paper's field. S8: the pixel path, 64x64.
    "S4": dict(data="mnist5k", out="runs/gen_mnist", steps=1200, n_classes_per_step=10,
               gen_per_label=8, n_pos=32, n_unc=4, lr=2e-3, weight_decay=0.01, warmup=50,
               ema=0.99, cfg_power=3.0, no_cfg_frac=0.0, mae_ckpt="runs/mae_mnist",
               device="cpu", log_every=20, ckpt_every=300, sample_every=300, fast_loss=True,
               cache_features=True, eval_every=300, snapshot_every=300, attract=1.5),
    "S2": dict(data="latents", out="runs/S2", steps=1000, n_classes_per_step=8,
               gen_per_label=16, n_pos=16, n_unc=4, lr=1e-3, weight_decay=0.01, warmup=50,
               ema=0.99, cfg_power=3.0, no_cfg_frac=0.0),
    "S8": dict(data="images", out="runs/S8", steps=100, n_classes_per_step=4, gen_per_label=8,
               n_pos=8, n_unc=4, lr=1e-3, weight_decay=0.01, warmup=10, ema=0.99,
               cfg_power=3.0, no_cfg_frac=0.0, image_size=64, augment=True),
}
ABLATION_FLAGS = ["kernel", "kernel_norm", "sinkhorn_iters"]   # field.drift_loss only (issue 18)
PRESET = {"ablation": "B2"}     # recipe -> DriftDiT_models preset (the others share its name)
DATA = ["mnist5k", "latents", "images"]
# --resume: flags that may differ from the run's recorded ones (schedule length, logging,
# where it runs); any other change needs --change-args, as the run would stop being the same.
FREE = {"steps", "log_every", "ckpt_every", "sample_every", "sample_alpha", "device", "compile",
        "ddp_timeout", "out", "resume", "overwrite", "change_args", "snapshot_every",
        "cache_features"}
POSITIVE = ["steps", "log_every", "ckpt_every", "batch", "holdout", "n_classes_per_step",
            "gen_per_label", "n_pos", "image_size", "cls_ramp", "lr", "ddp_timeout"]
NON_NEGATIVE = ["warmup", "weight_decay", "n_unc", "sample_every", "cfg_power", "no_cfg_frac",
                "eval_every", "snapshot_every"]
POSITIVE += ["eval_n"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's lines and shows every default."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors print on rank 0 only: torchrun starts one copy per GPU."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) == 0:
            super().error(message)                      # usage + message, exit 2
        sys.exit(2)


def make_parser(recipe):
    """The flat parser, its defaults set from `recipe` so that --help shows what will run."""
    p = Parser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--stage", choices=["gen", "mae"], default="gen", help="what to train")
    a("--model", choices=[k for k in RECIPES if not k.startswith("mae")], default="S4",
      help="gen: DriftDiT preset and its recipe (ablation = B2 size, Tab. 8 ablation recipe)")
    a("--out", help="run folder (log, pictures, checkpoint)")
    a("--data", help=f"one of {DATA}: built-in digits, a cache.py folder, an image folder")
    a("--data-path", help="mnist5k: the csv.gz (default: built in); latents: the cache; "
      "images: root/<class>/<image>")
    a("--image-size", type=int, default=256, help="images: ADM center-crop size")
    a("--augment", action=argparse.BooleanOptionalAction, default=False,
      help="images: RandomResizedCrop(0.2-1) + flip (official pixel recipes)")
    a("--steps", type=int, help="optimizer steps in total (also when resuming)")
    a("--lr", type=float, help="peak learning rate (AdamW)")
    a("--lr-decay", choices=["none", "cosine"], default="none", help="after the warmup")
    a("--warmup", type=int, help="linear lr warmup from 1e-6, in steps")
    a("--weight-decay", type=float, help="AdamW weight decay")
    a("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    a("--clip", type=float, default=2.0, help="gradient clip (global norm); -1 = off")
    a("--ema", type=float, help="EMA decay per step")
    a("--precision", choices=["bf16", "fp32"], default="bf16", help="CUDA autocast dtype")
    a("--device", default="auto", help="cpu | cuda | auto; torchrun uses cuda:LOCAL_RANK")
    a("--seed", type=int, default=0, help="global seed (data/mask stream of rank r: seed*world+r)")
    a("--log-every", type=int, default=100, help="steps between log lines")
    a("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    a("--resume", action="store_true", help="continue the run in --out, with its recorded flags")
    a("--change-args", action="store_true", help="--resume: allow flags that change the run "
      "(lr, seed, sizes...); without it such a flag is refused")
    a("--overwrite", action="store_true", help="replace the run in --out (else refused)")
    a("--ddp-timeout", type=float, default=30.0, help="minutes a rank waits for a frozen peer")
    a("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")
    g = p.add_argument_group("--stage mae (App. A.3)").add_argument
    g("--mae-model", choices=list(MAE_models), default="mnist", help="encoder.MAE_models preset "
      "and its recipe (mnist, mnist_pixel: the CPU one; the others: the paper's)")
    g("--batch", type=int, help="mae: global batch, split over the ranks (gen: N_c * N_neg)")
    g("--cls-start", type=int, default=-1, help="first step of the cls fine-tune; -1 = never")
    g("--cls-ramp", type=int, default=1000, help="steps of the linear lambda ramp")
    g("--cls-lambda", type=float, default=0.1, help="final lambda of lam*CE + (1-lam)*L_rec")
    g("--holdout", type=int, default=50, help="samples per class held out for the evaluation "
      "(mae: the final one; gen: FD_MAE with --eval-every)")
    g = p.add_argument_group("--stage gen (Alg. 1, App. A.6-A.9)").add_argument
    g("--n-classes-per-step", type=int, help="N_c groups per step, all ranks (official "
      "train_batch_size)")
    g("--gen-per-label", type=int, help="N_neg generated samples per group (one alpha each)")
    g("--n-pos", type=int, help="N_pos positives per group")
    g("--n-unc", type=int, help="N_unc unconditional real samples per group (CFG negatives)")
    g("--cfg-power", type=float, help="p(alpha) ~ alpha^-k on [1, 4] (official neg_cfg_pw)")
    g("--no-cfg-frac", type=float, help="fraction of groups at alpha = 1 (official no_cfg_frac)")
    g("--taus", type=float, nargs="+", default=[0.2, 0.05, 0.02], help="official R_list")
    g("--kernel", choices=["laplace", "gaussian"], default="laplace", help="drift kernel "
      "(field.drift_loss; Eq. 12 = laplace)")
    g("--kernel-norm", choices=["both", "y", "none", "sinkhorn"], default="both",
      help="affinity normalization (Tab. 11; both = Eq. 17, official)")
    g("--sinkhorn-iters", type=int, default=20, help="--kernel-norm sinkhorn: normalizations")
    g("--attract", type=float, default=1.0, help="a in V = a V+ - b V- (Tab. 1; after the "
      "drift normalization only a / b matters)")
    g("--repel", type=float, default=1.0, help="b in V = a V+ - b V- (Tab. 1)")
    g("--cache-features", action=argparse.BooleanOptionalAction, default=False,
      help="mnist5k: the frozen MAE's features of every real sample computed once, not per "
      "step (the same loss up to rounding; ~2 GB for MNIST-5k)")
    g("--fast-loss", action=argparse.BooleanOptionalAction, default=False,
      help="field_fast.drift_loss (same numbers, faster on CPUs) instead of field.drift_loss")
    g("--mae-ckpt", help="the frozen encoder phi (train.py --stage mae or convert.py)")
    g("--convnext", help="pixel models: ConvNeXt-V2 weights (facebook/convnextv2-base-22k-224, "
      "model.safetensors), the second encoder")
    g("--convnext-model", choices=list(ConvNeXt_models), default="base", help="its preset")
    g("--sample-every", type=int, default=5000, help="EMA sample grid every N steps; 0 = end")
    g("--eval-every", type=int, default=0, help="every N steps: FD_MAE, FD_pix and cls_acc "
      "(samples nearest their own class's mean, in FD_pix's features) of --eval-n EMA samples "
      "per class vs --holdout held-out real ones per class (then not trained on); 0 = off")
    g("--eval-n", type=int, default=50, help="EMA samples per class of the FD metrics")
    g("--snapshot-every", type=int, default=0, help="keep the EMA weights every N steps in "
      "snapshots/ (fid.py steps: FID vs step); 0 = off (small models only)")
    g("--sample-alpha", type=float, default=1.0, help="alpha of the grid")
    p.set_defaults(**recipe)
    return p


def given(argv, flag, default):
    """The value of `flag` on the command line (`--flag V` or `--flag=V`), else `default`."""
    for a, b in zip(argv, argv[1:] + [None]):
        if a == flag and b is not None:
            return b
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def parse_args(argv=None):
    """The recipe of the --stage/--model (--mae-model) on the command line sets the parser's
    defaults, then one strict parse_args (so --help and the run agree, and a typo is an
    error). --resume: the run's recorded flags, then those typed here (resumed_args). Every
    value is checked here, before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = given(argv, "--stage", "gen")
    parser = make_parser(RECIPES.get(("mae_mnist" if given(argv, "--mae-model", "mnist")
                                      .startswith("mnist") else "mae") if stage == "mae" else
                                     given(argv, "--model", "S4"), {}))
    args = parser.parse_args(argv)
    if args.resume:
        args = resumed_args(parser, argv, args)
    for k in POSITIVE + NON_NEGATIVE:
        v = getattr(args, k)
        if v is not None and not (v > 0 if k in POSITIVE else v >= 0):
            parser.error(f"--{k.replace('_', '-')} {v}: must be {'>' if k in POSITIVE else '>='} 0")
    if args.eval_every % args.log_every:
        parser.error(f"--eval-every {args.eval_every} must be a multiple of --log-every "
                     f"{args.log_every} (its value goes into that log row)")
    if not 0 <= args.ema < 1 or min(args.taus) <= 0:
        parser.error(f"--ema {args.ema} must be in [0, 1) and --taus {args.taus} > 0")
    if args.data not in DATA:
        parser.error(f"--stage {stage} takes --data from {DATA}, not {args.data!r}")
    if args.data in ("latents", "images") and not args.data_path:
        parser.error(f"--data {args.data} needs --data-path: " + (
            f"the cache folder (make it with: {CACHE_MAKE})" if args.data == "latents"
            else "an ImageNet-layout folder, e.g. .../train"))
    if args.cache_features and args.data != "mnist5k":
        parser.error(f"--cache-features: for --data mnist5k (held in memory), not --data "
                     f"{args.data}; pass --no-cache-features")
    ablated = [k for k in ABLATION_FLAGS if getattr(args, k) != parser.get_default(k)]
    if ablated and args.fast_loss:
        parser.error(f"{' '.join('--' + k.replace('_', '-') for k in ablated)}: the ablations "
                     f"are in field.drift_loss only; add --no-fast-loss")
    if args.attract < 0 or args.repel < 0 or args.sinkhorn_iters < 1:
        parser.error(f"--attract {args.attract}, --repel {args.repel} must be >= 0 and "
                     f"--sinkhorn-iters {args.sinkhorn_iters} >= 1")
    if args.stage == "gen":
        args.batch = args.n_classes_per_step * args.gen_per_label   # generated per step: img/s
    return args


def resumed_args(parser, argv, args):
    """--resume: the flags recorded in the run's checkpoint, overridden by the flags typed on
    this command line. A typed flag that differs is named; outside FREE it needs --change-args."""
    try:
        path, meta = read_metadata(args.out)
    except FileNotFoundError:
        parser.error(f"--resume: no checkpoint in {args.out} (model.safetensors); start the run "
                     f"without --resume")
    except ValueError as e:
        parser.error(f"--resume: {e}")
    was, unset = meta.get("args", {}), object()     # typed: what this command line sets itself
    typed = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset))))
    typed = {k: v for k, v in typed.items() if v is not unset}
    changed = {k: v for k, v in typed.items() if k in was and was[k] != v and k not in (
        "resume", "change_args", "overwrite", "out")}
    said = lambda keys: ", ".join(f"--{k.replace('_', '-')} {was[k]} -> {changed[k]}"
                                  for k in keys)
    defining = [k for k in changed if k not in FREE]
    if defining and not args.change_args:
        parser.error(f"--resume: this command changes the run in {args.out}: "
                     f"{said(defining)}. Drop those flags to continue it as it was, or pass "
                     f"--change-args")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"NOTE: resuming {args.out} with {said(changed)}")
    args = argparse.Namespace(**{**vars(args), **was, **typed, "out": args.out, "resume": True})
    if args.steps <= int(meta.get("step", 0)):
        parser.error(f"--steps {args.steps}: {path} is already at step {meta.get('step')}; pass "
                     f"a larger --steps to continue it")
    return args


# --- Helpers: schedules and the generator's step (Alg. 1) ---
def lr_at(step, args):
    """Linear warmup from 1e-6 (the official optax schedule), then constant or cosine."""
    if step < args.warmup:
        return 1e-6 + (args.lr - 1e-6) * step / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.5 * (1 + math.cos(math.pi * t)) if args.lr_decay == "cosine" else 1.0)


def cls_lambda(step, args):
    """The cls fine-tune weight: 0 before --cls-start, then a linear ramp to --cls-lambda."""
    if args.cls_start < 0 or step < args.cls_start:
        return 0.0
    return args.cls_lambda * min(1.0, (step - args.cls_start) / max(1, args.cls_ramp))


def generator_loss(net, phi, labels, alpha, pos, unc, noise, style_idx=None,
                   taus=(0.2, 0.05, 0.02), all_reduce=None, drift_loss=field.drift_loss,
                   cached=None, **field_kw):
    """The official train_step's loss_fn for n groups (as data.draw_groups gives them): x =
    f(noise | label, alpha) embedded by phi WITH gradient, the real samples without; feature
    group (B, T, D) -> n * T drift-loss rows, one per (class group, token). Returns (sum over
    groups of the mean row loss, {group: loss}, {tau: mean V_tau^2 over groups}, App. A.6).
    drift_loss: field.drift_loss (the reference) or field_fast.drift_loss (same numbers);
    field_kw: its ablation options (kernel, kernel_norm, a, b...; field.drift_loss only).
    cached: {name: (N, T, D)} the real samples' features, precomputed (embed_all); then pos
    and unc are item indices (n, N_pos), (n, N_unc) into it instead of images."""
    n, N_pos, N_unc = pos.shape[0], pos.shape[1], unc.shape[1]
    N_neg = noise.shape[0] // n
    embed = (lambda x: feature_groups(phi, x, **ACTIVATION_KWARGS)) if isinstance(
        phi, MAEResNet) else phi                                # pixel models: MAE + ConvNeXt
    # App. A.7: unconditional negatives weighted w = (alpha - 1)(N_neg - 1) / N_unc (-1: self-mask)
    w_unc = (alpha.float() - 1) * (N_neg - 1) / max(1, N_unc)                      # (n,)
    real = torch.cat([pos, unc], 1).flatten(0, 1)       # (n (N_pos+N_unc), C, H, W) or items
    with torch.no_grad():   # phi is frozen: a real sample's features are the same every step
        real = embed(real) if cached is None else {k: v[real] for k, v in cached.items()}
    x = net(noise, labels.repeat_interleave(N_neg), alpha.repeat_interleave(N_neg),
            style_idx=style_idx)                                # (n * N_neg, C, H, W)
    gen = embed(x)                                              # name -> (n * N_neg, T, D)
    # (n * m, T, D) -> (n * T, m, D): a row is one (class group, token), official '(b f) x d'
    rows = lambda f, m: f.unflatten(0, (n, m)).transpose(1, 2).flatten(0, 1)
    loss, per_group, V2 = 0.0, {}, dict.fromkeys(taus, 0.0)
    for name, f in gen.items():
        T = f.shape[1]
        y = rows(real[name], N_pos + N_unc)                     # (n * T, N_pos + N_unc, D)
        w = w_unc.repeat_interleave(T)[:, None].expand(-1, N_unc)                  # (n * T, N_unc)
        row_loss, info = drift_loss(rows(f, N_neg), y[:, :N_pos], y[:, N_pos:], w_neg=w,
                                    taus=taus, all_reduce=all_reduce, **field_kw)   # (n * T,)
        per_group[name] = row_loss.mean()
        loss = loss + per_group[name]
        for tau in taus:
            V2[tau] = V2[tau] + info[f"loss_{tau}"] / len(gen)
    return loss, per_group, V2


@torch.no_grad()
def embed_all(phi, images, batch=250):
    """images (N, C, H, W) -> {name: (N, T, D)}: every feature group of every real sample
    once (--cache-features), in batches; the frozen MAE in eval mode is deterministic."""
    parts = [feature_groups(phi, images[i:i + batch], **ACTIVATION_KWARGS)
             for i in range(0, len(images), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def mae_pooled(phi, x, batch=250):
    """x (n, C, H, W) -> (n, D) float64: the frozen MAE's last map (layer4) averaged over its
    grid, the features of the FD_MAE progress metric."""
    f = [phi.encoder(patchify(x[i:i + batch], phi.cfg.input_patch_size))[0]["layer4"]
         for i in range(0, len(x), batch)]                     # (b, D, h, w) each
    return torch.cat(f).mean((2, 3)).double().cpu().numpy()


@torch.no_grad()
def pixels_pooled(x, dims=256):
    """x (n, C, H, W) -> (n, <= dims) float64: x average-pooled by the smallest power-of-2
    factor that leaves at most `dims` numbers (MNIST: 2x2 -> 14 x 14 = 196), the features of
    the FD_pix progress metric. No network: it sees the blocks and speckles MAE features miss."""
    k = 1
    while x[0].numel() // k ** 2 > dims:
        k *= 2
    return torch.nn.functional.avg_pool2d(x.float(), k).flatten(1).double().cpu().numpy()


def frechet(a, b):
    """Frechet distance of Gaussians fitted to feature sets a (n, D) and b (m, D)."""
    return fid_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def class_accuracy(a, labels, b, b_labels):
    """Share of the samples a (n, D) whose nearest class mean of b (m, D) is their own label:
    cls_acc. FD and FID pool the classes and miss a generator that draws one digit for every
    label (README, the S4 search); this does not. labels (n,), b_labels (m,): numpy ints."""
    classes = np.unique(b_labels)
    means = np.stack([b[b_labels == c].mean(0) for c in classes])      # (K, D)
    nearest = ((a[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)    # (n,)
    return float((classes[nearest] == labels).mean())


# --- Main: DDP init, data, models, optimizer, then the loop ---
def main(argv=None):
    args = parse_args(argv)
    if not args.resume and not args.overwrite and any(os.path.exists(os.path.join(
            args.out, f)) for f in ("model.safetensors", "log.txt")):
        raise ValueError(f"--out {args.out} holds another run; pass --resume to continue it, "
                         f"--overwrite to replace it, or a new --out")
    ddp = "RANK" in os.environ                     # set by torchrun; absent under plain python
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0                             # only this rank prints, logs and saves
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch {torch.__version__} sees no CUDA "
                         f"device; pass --device cpu (or install a CUDA build of torch)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    if ddp:   # the timeout: a frozen peer ends the job instead of hanging the others forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=args.ddp_timeout))
    if master:
        print(json.dumps(vars(args)))
    rank_seed = args.seed * world + rank

    # -- data (MNIST-5k in memory; the latent cache memory-mapped; images decoded per step) --
    if args.data == "mnist5k":
        images, labels = mnist5k(args.data_path)
    else:
        images = (LatentCache(args.data_path) if args.data == "latents" else
                  ImageFolder(args.data_path, args.image_size, augment=args.augment))
        labels = images.labels
    shape = tuple(images.shape[1:]) if isinstance(images, torch.Tensor) else images.shape
    if args.stage == "mae":
        if args.batch % world or args.holdout < 1:
            raise ValueError(f"--batch {args.batch} must divide by the {world} ranks and "
                             f"--holdout {args.holdout} must be >= 1 (the final evaluation)")
        train_idx, held_idx = split_per_class(labels, args.holdout)
        held_idx = held_idx[::max(1, len(held_idx) // 1000)]  # evaluate at most ~1000 items
        cfg = MAEConfig(**MAE_models[args.mae_model])
        if shape[0] != cfg.in_channels or labels.max() >= cfg.num_classes:
            raise ValueError(f"--data {args.data} holds {shape} samples of {int(labels.max()) + 1} "
                             f"classes; --mae-model {args.mae_model} takes {cfg.in_channels} "
                             f"channels and {cfg.num_classes} classes (latents: latent_256 / "
                             f"latent_640; MNIST: mnist)")
        if args.batch // world > len(train_idx):
            raise ValueError(f"--batch {args.batch} ({args.batch // world} per rank) is more than "
                             f"the {len(train_idx)} training samples of --data {args.data}: pass "
                             f"a smaller --batch (MNIST: the mnist recipe's 64)")
        torch.manual_seed(args.seed)                            # the same init on every rank
        model = MAEResNet(cfg)
        sampler = TensorSampler(subset(images, train_idx), labels[train_idx], rank_seed)
        streams, info_data = {"data": sampler}, dict(holdout=args.holdout)
        torch.manual_seed(rank_seed)                            # masks: one stream per rank
    else:
        cfg = DriftDiTConfig(**DriftDiT_models[PRESET.get(args.model, args.model)])
        if args.n_classes_per_step % world:
            raise ValueError(f"--n-classes-per-step {args.n_classes_per_step} must divide by "
                             f"the {world} ranks (each class group lives whole on one rank)")
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if shape != want or labels.max() >= cfg.num_classes:
            raise ValueError(f"--data {args.data} holds {shape} samples of {int(labels.max()) + 1} "
                             f"classes; --model {args.model} makes {want} of {cfg.num_classes} "
                             f"classes (MNIST: --model S4)")
        if not args.mae_ckpt or not os.path.exists(args.mae_ckpt):
            raise ValueError(f"--mae-ckpt {args.mae_ckpt}: no such file or run folder. The "
                             f"generator needs a trained feature encoder: train it first with "
                             f"`python train.py --stage mae --out {args.mae_ckpt or 'runs/mae'}` "
                             f"(MNIST, CPU: ~1 min), or convert an official MAE with convert.py")
        phi = mae_from_state(*read_checkpoint(args.mae_ckpt, "mae")[:2], encoder_only=True)
        phi = phi.to(device).requires_grad_(False).eval()      # frozen; x still gets grads
        if phi.cfg.in_channels != cfg.in_channels:
            raise ValueError(f"--mae-ckpt {args.mae_ckpt}: an MAE of {phi.cfg.in_channels}-"
                             f"channel inputs; --model {args.model} makes {cfg.in_channels} "
                             f"channels: pass the MAE trained on this --data")
        if (args.model in ("B16", "L16") and not args.convnext) or (
                args.convnext and cfg.in_channels != 3):
            raise ValueError(f"--model {args.model} with --convnext {args.convnext}: the pixel "
                             f"models B16, L16 (RGB) use ConvNeXt-V2 features beside the MAE, "
                             f"pass --convnext PATH (facebook/convnextv2-base-22k-224 weights)")
        if args.convnext:                                       # pixel models: two encoders
            convnext, mae = convnext_from_hf(args.convnext, args.convnext_model).to(device), phi
            phi = lambda x: pixel_feature_groups(mae, convnext, x, **ACTIVATION_KWARGS)
        torch.manual_seed(args.seed)                            # the same init on every rank
        model = DriftDiT(cfg)
        if args.eval_every:             # the metric's real samples are held out of training
            if not isinstance(phi, MAEResNet):
                raise ValueError("--eval-every: FD_MAE needs an MAE encoder alone (not the "
                                 "pixel models' MAE + ConvNeXt); pass --eval-every 0")
            if args.holdout >= labels.bincount().min():
                raise ValueError(f"--holdout {args.holdout}: --data {args.data} has "
                                 f"{labels.bincount().min()} samples in its smallest class, "
                                 f"none would be left to train on; pass a smaller --holdout "
                                 f"or --eval-every 0")
            train_idx, held_idx = split_per_class(labels, args.holdout)
            held = take(images, held_idx, torch.Generator()).to(device)
            real = dict(fd_mae=mae_pooled(phi, held), fd_pix=pixels_pooled(held),
                        labels=labels[held_idx].numpy())
            images, labels = subset(images, train_idx), labels[train_idx]
        cached = None
        if args.cache_features:         # the sampler then draws item indices, not images
            cached, images = embed_all(phi, images.to(device)), torch.arange(len(images))
            if master:
                print(f"--cache-features: {len(images)} real samples' feature groups, "
                      f"{sum(v.numel() for v in cached.values()) * 4 / 2 ** 30:.2f} GiB")
        sampler, streams = TensorSampler(images, labels, args.seed), {}
        per_rank = args.n_classes_per_step // world
        mine = range(rank * per_rank, (rank + 1) * per_rank)    # this rank's global groups
        info_data = dict(mae=args.mae_ckpt, convnext=args.convnext,
                         holdout=args.holdout if args.eval_every else None)
    meta = dict(kind=args.stage, config=json.dumps(asdict(cfg)), args=json.dumps(vars(args)),
                data=json.dumps(dict(data=args.data, path=args.data_path, **info_data)))
    if master:
        print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params | {len(labels)} samples of shape {shape}")

    # -- optimizer, EMA, resume, DDP --
    raw = model.to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    start, history, saved_at = 0, [], None
    if args.resume:
        state = load_training_checkpoint(args.out, raw, ema, meta, strict=not args.change_args)
        opt.load_state_dict(state["optimizer"])
        start = saved_at = state["step"]
        history = state["history"]
        if len(state["rng"]) == world:                          # this rank's streams go on
            torch.set_rng_state(state["rng"][rank]["torch"])
            if device.type == "cuda" and "cuda" in state["rng"][rank]:   # not if saved on CPU
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
            for k, v in streams.items():
                v.load_state_dict(state["rng"][rank][k])
        elif streams and master:
            print(f"NOTE: saved with {len(state['rng'])} ranks, resumed on {world}: fresh data "
                   f"and mask streams, not an exact continuation")
        if master:
            print(f"resumed {args.out} at step {start}")
    else:
        update_ema(ema, raw, 0.0)
    net = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    if args.compile:                # opt-in: minutes of compiling first, then faster steps
        net = torch.compile(net)
    raw.train()                     # important: the MAE masks and the generator's dropout
    amp = torch.autocast(device.type, torch.bfloat16,
                         enabled=device.type == "cuda" and args.precision == "bf16")
    log, ckpt = os.path.join(args.out, "log.txt"), os.path.join(args.out, "model.safetensors")
    jsonl = os.path.join(args.out, "log.jsonl")
    if master:                      # the folder is made now that every input has been checked
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite and not args.resume and os.path.exists(ckpt):
            os.remove(ckpt)                                     # --overwrite: the old run goes
        if os.path.exists(ckpt + ".tmp"):
            os.remove(ckpt + ".tmp")                            # a save killed half-way
        if args.snapshot_every:
            os.makedirs(os.path.join(args.out, "snapshots"), exist_ok=True)
        if not args.resume:
            open(log, "w").close()                              # a fresh run, a fresh log
        rows = open(jsonl).readlines() if args.resume and os.path.exists(jsonl) else []
        with open(jsonl, "w") as f:                             # rows after the checkpoint go:
            f.writelines(r for r in rows if json.loads(r)["step"] <= start)   # they rerun

    # issue 18's ablations (field_fast has a and b; parse_args refuses the others with it)
    ablation = dict(kernel=args.kernel, kernel_norm=args.kernel_norm,
                    sinkhorn_iters=args.sinkhorn_iters, a=args.attract, b=args.repel)

    def losses(model, batch, step):
        """The stage's loss on one step's batch -> (loss, {name: logged value})."""
        with amp:
            if args.stage == "mae":     # App. A.3: masked L2 (+ lambda CE in the fine-tune)
                lam = cls_lambda(step, args)
                loss, out = model(*batch, lam)                  # forward = mae_loss
                info = {"recon": out["recon_loss"]}
                if args.cls_start >= 0:
                    info.update(cls=out["cls_loss"], acc=out["accuracy"],
                                lam=torch.tensor(lam, device=device))
                return loss, info
            # Alg. 1: the drift loss on every feature group
            loss, _, V2 = generator_loss(model, phi, *batch, taus=args.taus, all_reduce=(
                lambda t: dist.all_reduce(t) or t) if ddp else None,    # sum, in place
                drift_loss=field_fast.drift_loss if args.fast_loss else field.drift_loss,
                cached=cached, **ablation)
            return loss, {f"V2_{tau}": v for tau, v in V2.items()}

    def stopped(what):              # the error of a run that went non-finite
        return FloatingPointError(f"{what}; stopped. " + (
            f"The last good checkpoint, {ckpt} (step {saved_at}), is untouched: resume it with "
            f"a lower lr or clip, e.g. python train.py --resume --out {args.out} --lr "
            f"{args.lr / 10:g} --change-args" if saved_at else
            "No checkpoint was written: start again with a lower --lr or --clip"))

    # -- the loop --
    sums, n, t0 = {}, 0, time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.stage,
               disable=not master, mininterval=1.0)
    for step in bar:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [t.to(device) for t in (sampler.batch(args.batch // world) if args.stage == "mae"
                                        else draw_groups(sampler, cfg, args, step, mine))]
        loss, info = losses(net, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(),
                                               args.clip if args.clip > 0 else math.inf)
        opt.step()
        update_ema(ema, raw, args.ema)
        for k, v in dict(loss=loss.detach(), gnorm=gnorm, **info).items():
            sums[k] = sums.get(k, 0) + v.float()             # on device: no sync
        n, done = n + 1, step + 1
        if (master and args.stage == "gen" and cfg.out_channels in (1, 3) and (
                done == args.steps or args.sample_every > 0 and done % args.sample_every == 0)):
            lab = sampler.classes[:10].repeat_interleave(10)    # a row per class, fixed seeds
            x = generate(ema, list(range(len(lab))), lab, args.sample_alpha, 1, device)
            save_grid(decode(x), len(lab) // 10, os.path.join(args.out, "samples.png"), scale=2)
        if master and args.stage == "gen" and args.snapshot_every and (
                done % args.snapshot_every == 0):               # EMA only: fid.py steps
            save_checkpoint(ema, os.path.join(args.out, "snapshots", f"ema_{done:07d}"
                                              ".safetensors"), step=done)
        stopping = bool(STOP)       # SIGINT / SIGTERM seen (cli's handler): save, then exit
        if ddp:                     # all ranks stop after the same step (a 1-number all_reduce)
            flag = torch.tensor([float(stopping)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = flag.item() > 0
        save_now = stopping or done % args.ckpt_every == 0 or done == args.steps
        eval_now = args.stage == "gen" and args.eval_every > 0 and (
            done % args.eval_every == 0 or done == args.steps)
        if done % args.log_every and not (save_now or eval_now):
            continue
        avg = torch.stack(list(sums.values())) / n                  # one all_reduce per line
        if ddp:
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        avg = dict(zip(sums, avg.tolist()))
        if not all(map(math.isfinite, avg.values())):
            # NOTE: checked at log/checkpoint steps only (a per-step check would sync every
            # step); no checkpoint is written after the bad step, so the last one stays good.
            raise stopped(f"non-finite loss or gradient in steps {done - n + 1}..{done} ({avg})")
        img_s = n * args.batch / (time.time() - t0)
        if eval_now and master:     # EMA samples of fixed seeds vs the held-out digits
            lab = sampler.classes.repeat_interleave(args.eval_n)
            x = torch.cat([generate(ema, list(range(len(lab)))[i:i + 250], lab[i:i + 250],
                                    args.sample_alpha, 2, device)
                           for i in range(0, len(lab), 250)])           # (K eval_n, C, H, W)
            avg["fd_mae"] = frechet(mae_pooled(phi, x), real["fd_mae"])
            pix = pixels_pooled(x)
            avg["fd_pix"] = frechet(pix, real["fd_pix"])
            avg["cls_acc"] = class_accuracy(pix, lab.numpy(), real["fd_pix"], real["labels"])
        mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
        extra = " | ".join(f"{k} {v:.4g}" for k, v in avg.items() if k not in ("loss", "gnorm"))
        line = (f"step {done:07d} | loss {avg['loss']:.4f} | {extra} | gnorm {avg['gnorm']:.2f} "
                f"| lr {lr:.2e} | {img_s:.0f} img/s | {mem:.2f} GB")
        history.append(dict(step=done, **avg))
        if master:
            bar.write(line)
            with open(log, "a") as f:
                print(line, file=f)
            with open(jsonl, "a") as f:            # the same line for programs: log.jsonl
                row = dict(step=done, **avg, lr=lr, img_s=round(img_s, 1), gb=round(mem, 3))
                if args.eval_every:
                    for k in ("fd_mae", "fd_pix", "cls_acc"):
                        row.setdefault(k, None)
                print(json.dumps(row), file=f)
        if save_now:
            # The update must have left usable weights: every weight and EMA tensor finite, and
            # the updated weights' loss on this step's batch finite (weights of 1e30 are finite,
            # their next loss is not). fork_rng: the check takes no random numbers from the
            # run's streams, so a resumed run stays exact.
            with torch.no_grad(), torch.random.fork_rng([device] if device.type == "cuda" else []):
                after = losses(raw, batch, step)[0].detach().float().reshape(1)
            if ddp:
                dist.all_reduce(after, op=dist.ReduceOp.AVG)
            weights = [*raw.state_dict().items(), *(("ema/" + k, t) for k, t in
                                                    ema.state_dict().items())]
            bad = [k for k, t in weights if t.is_floating_point() and not t.isfinite().all()]
            if bad or not math.isfinite(after.item()):
                raise stopped(f"after the update of step {done}, " + (
                    f"tensor {bad[0]!r} holds NaN or inf" if bad else
                    f"the weights give a loss of {after.item()} on the same batch"))
            rng = {k: v.state_dict() for k, v in streams.items()}   # this rank's data stream,
            rng["torch"] = torch.get_rng_state()                     # masks and dropout
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            rngs = [rng] * world
            if ddp:
                dist.all_gather_object(rngs, rng)
            if master:
                save_checkpoint(raw, ckpt, args.stage, ema=ema, step=done, args=meta["args"],
                                data=meta["data"], train_state=dict(
                                    optimizer=opt.state_dict(), step=done, rng=rngs,
                                    history=history))
            saved_at = done
        if stopping:
            sig = signal.Signals(STOP[0] if STOP else signal.SIGTERM)
            if master:
                print(f"{sig.name}: stopped after step {done}; checkpoint {ckpt}. Continue with: "
                      f"python train.py --resume --out {args.out}", file=sys.stderr)
            raise SystemExit(128 + sig)
        sums, n, t0 = {}, 0, time.time()

    # -- the end: curves, pictures, evaluation (rank 0) --
    summary = dict(step=args.steps, **{k: v for k, v in history[-1].items() if k != "step"})
    steps_logged = [h["step"] for h in history]
    if master and args.stage == "gen":
        save_curves(os.path.join(args.out, "loss.png"), {f"tau {t}": (steps_logged, [
            h[f"V2_{t}"] for h in history]) for t in args.taus}, title=f"DriftDiT {args.model}"
            f" on {args.data}", ylabel="mean V^2 per tau (over feature groups)")
        fd = [h for h in history if "fd_mae" in h]
        if fd:                      # the metrics that move while V^2 stays flat
            save_curves(os.path.join(args.out, "fd_mae.png"), {
                "FD_MAE (MAE layer-4 means, 256-d)": ([h["step"] for h in fd],
                                                     [h["fd_mae"] for h in fd]),
                "FD_pix / 100 (pooled pixels)": ([h["step"] for h in fd],
                                                 [h["fd_pix"] / 100 for h in fd])},
                title=f"{args.model} on {args.data}: {args.eval_n}/class EMA vs "
                f"{args.holdout}/class held out", ylabel="Frechet distance")
    if master and args.stage == "mae":   # held-out items, fixed masks, vs the mean image
        pick = lambda idx: take(images, idx, torch.Generator()).to(device)
        x_held, mean_image = pick(held_idx), pick(train_idx[::len(train_idx) // 5000 + 1]).mean(0)
        ema_l2, baseline = mae_eval(ema, x_held, mean_image)
        raw_l2, _ = mae_eval(raw.eval(), x_held, mean_image)
        summary = dict(step=args.steps, held_out=len(held_idx), ema_masked_l2=ema_l2,
                       raw_masked_l2=raw_l2, mean_image_masked_l2=baseline)
        with open(log, "a") as f:
            print(json.dumps(summary), file=f)
        print(f"held-out masked L2 (per masked location): EMA {ema_l2:.4f} | raw {raw_l2:.4f} "
              f"| mean-image baseline {baseline:.4f}")
        save_curves(os.path.join(args.out, "mae_loss.png"), {
            "train loss (masked L2)": (steps_logged, [h["loss"] for h in history]),
            f"held-out EMA {ema_l2:.3f}": (steps_logged, [ema_l2] * len(history)),
            f"mean-image baseline {baseline:.3f}": (steps_logged, [baseline] * len(history))},
            title=f"MAE {args.mae_model} on {args.data}", ylabel="masked L2")
        if cfg.in_channels in (1, 3):   # one held-out item per class: masked, recon, original
            save_grid(decode(mae_picture(ema, x_held[::args.holdout][:10])), 3,
                      os.path.join(args.out, "mae.png"), scale=3)
    if master:
        print(f"wrote {ckpt} (step {args.steps}) and in {args.out}: " + ", ".join(sorted(
            f for f in os.listdir(args.out) if f.endswith((".png", ".txt", ".jsonl")))))
    if ddp:
        dist.barrier()                                          # rank 0 finished its pictures
        dist.destroy_process_group()
    return summary


STOP = []   # the signals cli's handler has seen; the loop saves and exits at the step's end


def cli(argv=None):
    """The command line: SIGINT / SIGTERM end the run at the next step boundary with a
    checkpoint (the same signal again: at once, the last complete checkpoint stands), and a
    refused input or a failed run ends in one message (from rank 0 under torchrun), exit 1."""
    def on_signal(sig, frame):
        if STOP:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        STOP.append(sig)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(sig).name}: finishing this step, then a checkpoint (send "
                  f"it again to stop at once)", file=sys.stderr, flush=True)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    try:
        main(argv)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        peer = isinstance(e, dist.DistError) or "Timed out" in str(e)     # gloo's timeout
        if isinstance(e, RuntimeError) and not peer:
            raise                                       # a bug: keep its traceback
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(e, OSError) or peer:
            print(f"train.py: error: {e}" + (" (a peer did not answer within --ddp-timeout: "
                  "frozen or dead; the last checkpoint stands, continue with --resume)"
                  if peer else ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
