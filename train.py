"""
Train a Drifting Model or its feature encoder. One loop, one file, no framework.

Stages:
  toy   a 2-D MLP generator on a toy distribution with the simple kernel field (Sec. 5.1,
        Fig. 3-4; the official toy notebook). Runs on a laptop CPU in about a minute.
  mae   the feature encoder phi: a ResNet masked autoencoder (App. A.3), optionally ending with
        the classification fine-tune. Plain python or torchrun (DDP), CPU or GPU (bf16).
  gen   the generator (Alg. 1, App. A.6-A.9; official train.py::train_step): per step N_c
        class groups, each with one CFG alpha, N_neg generated, N_pos positive and N_unc
        unconditional real samples; the drift loss on every feature group of the frozen MAE.
        --model picks the paper's recipe (Tab. 8): ablation, B2, L2, B16, L16; S2/S4 tiny.

    python train.py                                  # toy checkerboard -> runs/toy/
    python train.py --data swiss_roll --out runs/toy_swiss
    python train.py --data bimodal --init far        # Fig. 3: start far from both modes
    # MAE on MNIST-5k, CPU, ~4 min on 2 cores (held-out masked L2 0.033 vs 0.28 mean image):
    python train.py --stage mae --steps 800 --batch 64 --warmup 50 --ema 0.99 \\
        --log-every 50 --ckpt-every 200 --out runs/mae_mnist
    python train.py --stage mae --steps 1600 ... --out runs/mae_mnist --resume  # continue
    torchrun --standalone --nproc_per_node=2 train.py --stage mae ...          # DDP (gloo/nccl)
    # generator on MNIST-5k with that MAE, CPU (S4 recipe, 28x28, patch 4):
    python train.py --stage gen --model S4                 # -> runs/gen_mnist/samples.png
    torchrun --standalone --nproc_per_node=8 train.py --model L2 --data-path CACHE --mae-ckpt M

The flag defaults shown by --help are the toy stage's; --stage mae starts from RECIPES["mae"]
(the paper's MAE recipe, App. A.3), --stage gen from RECIPES["gen"] + GEN_RECIPES[--model];
any flag given overrides it.
Checkpoint (mae, gen) in --out: model.safetensors (weights under their names, the EMA under "ema/";
metadata: kind, model config, data, args, step) + train_state.pt (optimizer, step, per-rank RNG
states, loss history; torch.load(..., weights_only=True)). Both are replaced atomically.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2). Equation numbers refer to v2.
"""
import argparse
import copy
import json
import math
import os
import resource
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cache import CACHE_MAKE, LatentCache
from convnext import ConvNeXt_models, convnext_from_hf, pixel_feature_groups
from data import TOY_DATA, ImageFolder, TensorSampler, mnist5k, split_per_class, subset, take
from encoder import (ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, feature_groups,
                     mae_from_state, masked_l2, patch_mask, patchify, unpatchify)
from field import drift_field, drift_loss
from models import MLP, DriftDiT, DriftDiT_models, DriftDiTConfig, read_checkpoint
from models import save_checkpoint as save_weights

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--stage", choices=["toy", "mae", "gen"], default=None,
                    help="what to train (default: gen if --model is given, else toy)")
parser.add_argument("--out", default="runs/toy", help="run folder (log, pictures, checkpoint)")
parser.add_argument("--seed", type=int, default=0, help="global seed (rank r uses seed*world+r)")
parser.add_argument("--device", default="cpu",
                    help="cpu | cuda | auto (cuda if available); torchrun uses cuda:LOCAL_RANK")
parser.add_argument("--data", default="checkerboard",
                    help=f"toy: one of {list(TOY_DATA)}; mae, gen: mnist5k, latents (a latent "
                         f"cache made by cache.py), images (an ImageNet-layout folder)")
parser.add_argument("--data-path", default=None,
                    help="mnist5k: the csv.gz (default: built-in copy); latents: the cache "
                         "folder; images: root/<class>/<image>")
parser.add_argument("--image-size", type=int, default=256, help="images: ADM crop size")
parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                    help="images: RandomResizedCrop(0.2-1) + flip of real samples (official "
                         "pixel recipes) instead of center crop + flip")
parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (total, on resume)")
parser.add_argument("--batch", type=int, default=1024,
                    help="toy: generated samples per step (the notebook uses 2048; 1024 with the "
                         "cosine lr reaches the same quality in half the time on a CPU); "
                         "mae: global batch, split over the ranks; gen: set to N_c * N_neg")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam/AdamW)")
parser.add_argument("--lr-decay", choices=["none", "cosine"], default="cosine",
                    help="after warmup: constant (the paper's) or cosine to 0 (the toy's: it "
                         "removes the last optimizer jitter; the notebook keeps it constant)")
parser.add_argument("--warmup", type=int, default=0, help="linear lr warmup steps from 1e-6")
parser.add_argument("--log-every", type=int, default=100, help="log interval in steps")
# toy stage (defaults: the official notebook's, except --batch/--n-pos/--lr-decay)
parser.add_argument("--n-pos", type=int, default=1024,
                    help="toy: data samples per step; gen: positives per class N_pos")
parser.add_argument("--tau", type=float, default=0.05, help="toy: kernel temperature (Eq. 12)")
parser.add_argument("--kernel-norm", choices=["both", "y", "none", "per_set"], default="both",
                    help="toy: kernel normalization (Tab. 11); 'both' is the paper's")
parser.add_argument("--init", choices=["default", "far", "collapsed"], default="default",
                    help="toy, Fig. 3 starts: shift the generator's output bias far away (+3, +3) "
                         "or onto one mode (+1, 0) with tiny weights")
parser.add_argument("--frames", default="0,50,100,200,400,800,1400,2000",
                    help="toy: steps at which q is drawn for the evolution strip")
parser.add_argument("--eval-n", type=int, default=5000, help="toy: points for the energy distance")
# trained stages (mae; the generator stage reuses these): paper App. A.3 / official configs
parser.add_argument("--mae-model", choices=list(MAE_models), default="mnist",
                    help="mae: encoder.MAE_models preset (the paper's latent_256 / latent_640 "
                         "need the latent data of a later issue)")
parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
parser.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
parser.add_argument("--clip", type=float, default=2.0, help="gradient clip (global norm); -1 = off")
parser.add_argument("--ema", type=float, default=0.9995, help="EMA decay per step")
parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="autocast dtype on CUDA; a CPU run is always fp32")
parser.add_argument("--ckpt-every", type=int, default=5000, help="checkpoint interval in steps")
parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
parser.add_argument("--compile", action="store_true",
                    help="mae, gen: torch.compile the model (checkpoints stay plain state dicts)")
parser.add_argument("--cls-start", type=int, default=-1,
                    help="mae: step where the cls fine-tune starts (-1 = never; the official "
                         "MAE-640 starts it 3k steps before the end)")
parser.add_argument("--cls-ramp", type=int, default=1000, help="mae: steps of the lambda ramp")
parser.add_argument("--cls-lambda", type=float, default=0.1,
                    help="mae: final lambda of lambda*L_cls + (1-lambda)*L_rec")
parser.add_argument("--holdout", type=int, default=50,
                    help="mae on mnist5k: digits per class held out for the final evaluation")
# generator stage: paper Tab. 8 / configs/gen/*.yaml, one recipe per --model (GEN_RECIPES)
parser.add_argument("--model", choices=list(DriftDiT_models) + ["ablation"], default=None,
                    help="gen: DriftDiT preset and its recipe (ablation: B2 size, the ablation "
                         "recipe of Tab. 8; S2/S4: tiny CPU recipes); default S4")
parser.add_argument("--n-classes-per-step", type=int, default=64,
                    help="gen: N_c class groups per step over ALL ranks (official "
                         "train_batch_size); each rank computes N_c / world whole groups")
parser.add_argument("--gen-per-label", type=int, default=64,
                    help="gen: N_neg generated samples per class group (one alpha per group)")
parser.add_argument("--n-unc", type=int, default=16,
                    help="gen: N_unc unconditional real samples per group (CFG negatives)")
parser.add_argument("--cfg-power", type=float, default=3.0,
                    help="gen: p(alpha) ~ alpha^-k on [1, 4] (official neg_cfg_pw)")
parser.add_argument("--no-cfg-frac", type=float, default=0.0,
                    help="gen: fraction of groups trained at alpha = 1 (official no_cfg_frac)")
parser.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.05, 0.02],
                    help="gen: kernel temperatures, one normalized field each (official R_list)")
parser.add_argument("--convnext", default=None,
                    help="gen, pixel models: ConvNeXt-V2 weights (model.safetensors of "
                         "facebook/convnextv2-base-22k-224, transformers naming), the second "
                         "feature encoder of the official pixel recipes (B16, L16 need it)")
parser.add_argument("--convnext-model", choices=list(ConvNeXt_models), default="base",
                    help="ConvNeXt-V2 preset of --convnext (tiny: CPU smoke runs)")
parser.add_argument("--mae-ckpt", default=None,
                    help="gen: the frozen feature encoder phi, a kind-mae weights file or run "
                         "folder (train.py --stage mae, or convert.py of an official MAE)")
parser.add_argument("--sample-every", type=int, default=5000,
                    help="gen: EMA sample grid (one row per class) every N steps; 0 = at the end")
parser.add_argument("--sample-alpha", type=float, default=1.0, help="gen: alpha of the grid")

# Per-stage starting values (the parser's defaults are the toy's). mae: the paper's recipe,
# App. A.3 / configs/mae/latent_ablation_256.yaml (batch 8192, 30k steps, warmup 4k, constant lr).
RECIPES = {"toy": {},
           "mae": dict(out="runs/mae", data="mnist5k", device="auto", steps=30000, batch=8192,
                       lr=4e-3, lr_decay="none", warmup=4000),
           "gen": dict(out="runs/gen", device="auto", lr_decay="none", clip=2.0, ema=0.999,
                       betas=[0.9, 0.95], taus=[0.2, 0.05, 0.02], cfg_power=5.0, no_cfg_frac=0.0,
                       gen_per_label=64, data="latents")}
# --stage gen: Tab. 8 (PAPER_NOTES §4) per --model, on top of RECIPES["gen"]. N_pos follows the
# official configs (B/2: paper 128, code 64). S2/S4 are ours: small enough for a CPU.
GEN_RECIPES = {
    "ablation": dict(n_classes_per_step=64, n_pos=64, n_unc=16, lr=2e-4, weight_decay=0.01,
                     warmup=5000, steps=30000, cfg_power=3.0),
    "B2": dict(n_classes_per_step=128, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.0,
               warmup=10000, steps=200000),
    "L2": dict(n_classes_per_step=128, n_pos=64, n_unc=32, lr=4e-4, weight_decay=0.01,
               warmup=10000, steps=200000, cfg_power=3.0, no_cfg_frac=0.5),
    "B16": dict(n_classes_per_step=128, n_pos=128, n_unc=32, lr=2e-4, weight_decay=0.01,
                warmup=10000, steps=100000, data="images", augment=True),
    "L16": dict(n_classes_per_step=128, n_pos=128, n_unc=32, lr=4e-4, weight_decay=0.01,
                warmup=10000, steps=100000, data="images", augment=True),
    "S2": dict(n_classes_per_step=8, gen_per_label=16, n_pos=16, n_unc=4, lr=1e-3,
               weight_decay=0.01, warmup=50, steps=1000, ema=0.99, cfg_power=3.0),
    # 64x64 pixels (S8) on an image folder: a CPU smoke run of the pixel path (MAE + ConvNeXt)
    "S8": dict(n_classes_per_step=4, gen_per_label=8, n_pos=8, n_unc=4, lr=1e-3,
               weight_decay=0.01, warmup=10, steps=100, ema=0.99, cfg_power=3.0,
               data="images", image_size=64, augment=True),
    # MNIST-5k, 28x28 (S4: patch 4) with the MAE of `--stage mae` above; EMA 0.99 and lr 2e-3
    # because a CPU run is 1k steps (22-29 min on 2 cores), not 30k: the zero-initialized output
    # starts gray and, under Adam, moves about lr per step toward the black background.
    "S4": dict(n_classes_per_step=10, gen_per_label=16, n_pos=16, n_unc=4, lr=2e-3,
               weight_decay=0.01, warmup=50, steps=1000, ema=0.99, cfg_power=3.0,
               data="mnist5k", mae_ckpt="runs/mae_mnist", out="runs/gen_mnist", device="cpu",
               log_every=20, ckpt_every=100, sample_every=50),
}
GEN_PRESET = {"ablation": "B2"}                 # recipe -> DriftDiT_models preset
DATA = {"toy": list(TOY_DATA), "mae": ["mnist5k", "latents", "images"],
        "gen": ["mnist5k", "latents", "images"]}


def recipe(stage, model):
    return {**RECIPES[stage], **(GEN_RECIPES[model] if stage == "gen" else {})}


def parse_args(argv=None):
    """The stage's recipe fills the namespace first, so argparse only sets what it lacks."""
    peek = parser.parse_known_args(argv)[0]                 # a peek; the strict parse follows
    stage = peek.stage or ("gen" if peek.model else "toy")  # `train.py --model L2` trains L2
    model = peek.model or "S4"
    args = parser.parse_args(argv, namespace=argparse.Namespace(**recipe(stage, model)))
    args.stage, args.model = stage, model
    if args.data not in DATA[stage]:
        parser.error(f"--stage {stage} takes --data from {DATA[stage]}, not {args.data!r}")
    if args.data in ("latents", "images") and not args.data_path:
        parser.error(f"--data {args.data} needs --data-path: "
                     + ("the cache folder (make it with: " + CACHE_MAKE + ")"
                        if args.data == "latents" else "an ImageNet-layout folder, e.g. .../train"))
    if stage == "gen":
        args.batch = args.n_classes_per_step * args.gen_per_label   # generated per step: img/s
    return args


# ------------------------------------------------------------------------------------------
# DDP init (nanoGPT's env detection: torchrun sets RANK; plain python is one process)
# ------------------------------------------------------------------------------------------
def init_distributed(device):
    ddp = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, device=device, master=rank == 0)


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw)


# ------------------------------------------------------------------------------------------
# Helpers: lr schedule, EMA, checkpoints, pictures, toy metric
# ------------------------------------------------------------------------------------------
def lr_at(step, args):
    """Linear warmup from 1e-6 over --warmup steps (the official optax schedule), then constant
    or cosine to 0 at --steps."""
    if step < args.warmup:
        return 1e-6 + (args.lr - 1e-6) * step / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.5 * (1 + math.cos(math.pi * t)) if args.lr_decay == "cosine" else 1.0)


@torch.no_grad()
def update_ema(ema, model, decay):
    """DiT's EMA, by parameter name, buffers copied; decay = 0 copies the model."""
    params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.mul_(decay).add_(params[name].detach(), alpha=1 - decay)
    buffers = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(buffers[name])


def save_atomic(tensors, path, metadata):
    """safetensors write to a temp file, then rename: a crash never leaves a half file."""
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


def save_checkpoint(run_dir, raw, ema, meta, state):
    """Weights + EMA (+ meta) in model.safetensors, the plain-typed train state in
    train_state.pt. The step is in both, so load_checkpoint can tell a torn pair."""
    extra = {k: v for k, v in meta.items() if k not in ("kind", "config")}
    save_weights(raw, os.path.join(run_dir, "model.safetensors"), kind=meta["kind"], ema=ema,
                 step=state["step"], **extra)                   # config: asdict(raw.cfg)
    path = os.path.join(run_dir, "train_state.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir, raw, ema, meta):
    """Load weights and EMA from run_dir into raw/ema and return the train state. Refuses a
    checkpoint whose kind, model config or data differ from this run's (meta)."""
    path = os.path.join(run_dir, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with safe_open(path, "pt") as f:
        saved = f.metadata()
    for key in ("kind", "config", "data"):
        if saved.get(key) != meta[key]:
            raise ValueError(f"--resume: {path} has {key} {saved.get(key)}, but this run has "
                             f"{meta[key]}; pass the flags it was trained with or a new --out")
    state_path = os.path.join(run_dir, "train_state.pt")
    state = torch.load(state_path, map_location="cpu", weights_only=True)   # plain types only
    if state["step"] != int(saved["step"]):
        raise RuntimeError(f"{run_dir}: weights at step {saved['step']} but train state at step "
                           f"{state['step']} (interrupted save?)")
    tensors = load_file(path)
    raw.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("ema/")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    return state


def rng_state(ctx, streams):
    """This rank's RNG: torch (CPU and CUDA: masks, dropout) and each data stream."""
    s = {"torch": torch.get_rng_state(), **{k: v.state_dict() for k, v in streams.items()}}
    if ctx.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return s


def set_rng_state(s, ctx, streams):
    torch.set_rng_state(s["torch"])
    if ctx.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], ctx.device)
    for k, v in streams.items():
        v.load_state_dict(s[k])


def peak_memory_gb(device):
    """Peak CUDA memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6     # Linux: KB


@torch.no_grad()
def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic, float64). For two independent
    samples of size n from the same law its expectation is 2 E|X-X'| / n: the noise floor."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean()
            - torch.cdist(y, y).mean()).item()


def draw_points(layers, size=320, lim=1.6, title=""):
    """Scatter plot with Pillow: layers = [(points (n, 2), (r, g, b)), ...], later on top."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    for pts, color in layers:
        px = ((pts.cpu().numpy() / lim + 1) * 0.5 * (size - 1)).round().astype(int)
        for u, v in px:
            if 0 <= u < size - 1 and 0 < v < size:
                d.rectangle([u, size - 1 - v, u + 1, size - v], fill=color)  # y points up
    d.rectangle([0, 0, size - 1, size - 1], outline=(160, 160, 160))
    if title:
        d.text((6, 4), title, fill=(0, 0, 0))
    return img


def hstack(images, pad=6):
    w = sum(im.width for im in images) + pad * (len(images) - 1)
    out = Image.new("RGB", (w, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + pad
    return out


def image_rows(rows, names, scale=4, pad=2, left=64):
    """Rows of images, each (n, 3, h, w) in [0, 1], as one picture with a name left of each."""
    n, _, h, w = rows[0].shape
    out = Image.new("RGB", (left + n * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    for r, (images, name) in enumerate(zip(rows, names)):
        y = r * (h * scale + pad)
        ImageDraw.Draw(out).text((4, y + h * scale // 2 - 6), name, fill=(0, 0, 0))
        for i, im in enumerate(images):
            a = (im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()   # (h, w, 3)
            tile = Image.fromarray(a).resize((w * scale, h * scale), Image.NEAREST)
            out.paste(tile, (left + i * (w * scale + pad), y))
    return out


def draw_curves(steps, series, hlines=(), size=(640, 360), title=""):
    """Line plot on a log10 y axis: series = [(name, values, rgb)], hlines = [(name, y, rgb)]."""
    W, H, L, T, B = *size, 56, 22, 24
    ys = [v for _, vals, _ in series for v in vals] + [y for _, y, _ in hlines]
    lo, hi = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
    X = lambda s: L + (W - L - 12) * (s - steps[0]) / max(1, steps[-1] - steps[0])
    Y = lambda v: T + (H - T - B) * (hi - math.log10(v)) / (hi - lo)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for k in range(math.floor(lo), math.ceil(hi) + 1):            # ticks at 1, 2, 5 x 10^k
        for m in (1, 2, 5):
            if lo <= math.log10(m * 10.0 ** k) <= hi:
                y = Y(m * 10.0 ** k)
                d.line([L, y, W - 12, y], fill=(225, 225, 225))
                d.text((4, y - 6), f"{m * 10.0 ** k:.3g}", fill=(90, 90, 90))
    for name, y, rgb in hlines:
        d.line([L, Y(y), W - 12, Y(y)], fill=rgb, width=1)
    for name, vals, rgb in series:
        d.line([(X(s), Y(v)) for s, v in zip(steps, vals)], fill=rgb, width=2)
    legend = list(series) + list(hlines)
    d.rectangle([W - 200, T + 28, W - 14, T + 34 + 12 * len(legend)], fill="white",
                outline=(200, 200, 200))
    for i, (name, _, rgb) in enumerate(legend):
        d.text((W - 194, T + 31 + 12 * i), name, fill=rgb)
    d.text((L, 4), title, fill=(0, 0, 0))
    d.text((W // 2 - 12, H - 16), "step", fill=(0, 0, 0))
    d.text((L - 8, H - 16), str(steps[0]), fill=(90, 90, 90))
    d.text((W - 60, H - 16), str(steps[-1]), fill=(90, 90, 90))
    return img


# ------------------------------------------------------------------------------------------
# Stage: toy 2-D
# ------------------------------------------------------------------------------------------
def train_toy(args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    sample = TOY_DATA[args.data]
    g_data = torch.Generator().manual_seed(args.seed + 1)            # training data stream
    model = MLP().to(device)
    with torch.no_grad():  # Fig. 3 initializations: move the start, keep the architecture
        if args.init != "default":
            last = model.net[-1]
            last.weight.mul_(0.01)
            last.bias.copy_(torch.tensor([3.0, 3.0] if args.init == "far" else [1.0, 0.0]))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    frames_at = sorted({int(s) for s in args.frames.split(",") if int(s) <= args.steps})
    fixed_noise = torch.randn(2000, model.noise_dim, generator=torch.Generator().manual_seed(7))
    ref = sample(2000, torch.Generator().manual_seed(8))
    grey, orange = (170, 190, 230), (230, 110, 20)
    frames, log = [], open(os.path.join(args.out, "log.txt"), "w")

    def snapshot(step):
        with torch.no_grad():
            q = model(fixed_noise.to(device))
        frames.append(draw_points([(ref, grey), (q, orange)], size=240, title=f"step {step}"))

    t0 = time.time()
    bar = tqdm(range(args.steps + 1), desc=f"toy {args.data}", mininterval=1.0)
    for step in bar:
        if step in frames_at:
            snapshot(step)
        if step == args.steps:
            break
        noise = torch.randn(args.batch, model.noise_dim, device=device)
        x = model(noise)                                             # (N, 2) generated
        y_pos = sample(args.n_pos, g_data).to(device)                # (P, 2) data
        x_sg = x.detach()
        V = drift_field(x_sg, y_pos, x_sg, tau=args.tau, kernel_norm=args.kernel_norm)
        # Eq. (6): regress x onto the frozen drifted target x + V; the value is mean ||V||^2 / D.
        loss = F.mse_loss(x, x_sg + V)                               # x_sg, V carry no grad
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping "
                                     f"(try a larger --tau or smaller --lr)")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0:
            line = (f"step {step:5d} | loss {loss.item():.3e} | lr {lr_at(step, args):.2e} | "
                    f"{time.time() - t0:.1f}s")
            bar.set_postfix_str(f"loss {loss.item():.2e}")
            print(line, file=log, flush=True)
    train_time = time.time() - t0

    # Quality: energy distance of fresh generated points to held-out data, next to the
    # real-vs-real floor at the same size (mean over 3 independent pairs of real sets).
    n = args.eval_n
    with torch.no_grad():
        gen = model(torch.randn(n, model.noise_dim, device=device)).cpu()
    held = sample(n, torch.Generator().manual_seed(10_001))
    ed = energy_distance(gen, held)
    floor = float(np.mean([energy_distance(sample(n, torch.Generator().manual_seed(20_000 + i)),
                                           sample(n, torch.Generator().manual_seed(30_000 + i)))
                           for i in range(3)]))
    summary = dict(data=args.data, steps=args.steps, train_seconds=round(train_time, 1),
                   energy_distance=ed, floor=floor, ratio=ed / floor)
    print(json.dumps(summary), file=log, flush=True)
    log.close()

    final = draw_points([(held[:3000], grey), (gen[:3000], orange)], size=420,
                        title=f"{args.data}: data (blue) vs generated (orange)")
    final.save(os.path.join(args.out, "toy.png"))
    hstack(frames).save(os.path.join(args.out, "toy_evolution.png"))
    save_atomic(model.state_dict(), os.path.join(args.out, "model.safetensors"),
                {"kind": "mlp", "config": json.dumps(dict(kind="mlp", noise_dim=model.noise_dim)),
                 "args": json.dumps(vars(args))})
    print(f"trained {args.steps} steps in {train_time:.1f}s | energy distance {ed:.2e} | "
          f"real-vs-real floor {floor:.2e} | ratio {ed / floor:.2f}")
    print(f"wrote {args.out}/toy.png, toy_evolution.png, model.safetensors, log.txt")
    return summary


# ------------------------------------------------------------------------------------------
# The loop of the trained stages: AdamW + warmup, bf16 autocast on CUDA, clip, EMA, DDP,
# log lines, atomic checkpoints, exact resume, a stop on a non-finite loss
# ------------------------------------------------------------------------------------------
def fit(args, ctx, raw, meta, streams, loss_fn, hook=None):
    """loss_fn(model, step) -> (loss, info: dict of detached scalar tensors) draws its own batch
    from `streams` (name -> object with state_dict / load_state_dict, saved per rank).
    hook(steps_done, ema), if given, runs on rank 0 after every step (pictures; it must not
    touch the global RNG or call collectives). Returns (raw, ema, history: one dict of averages
    per log line)."""
    raw = raw.to(ctx.device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    start, history, saved_at = 0, [], None
    if args.resume:
        state = load_checkpoint(args.out, raw, ema, meta)
        opt.load_state_dict(state["optimizer"])
        start = saved_at = state["step"]
        history = state["history"]
        if len(state["rng"]) == ctx.world:
            set_rng_state(state["rng"][ctx.rank], ctx, streams)
        elif streams:                                           # (gen: stateless draws)
            print0(f"NOTE: saved with {len(state['rng'])} ranks, resumed on {ctx.world}: fresh "
                   f"data and mask streams, not an exact continuation")
        print0(f"resumed {args.out} at step {start}")
    else:
        update_ema(ema, raw, 0.0)
    net = DDP(raw, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.ddp else raw
    if args.compile:                # opt-in: minutes of compiling first, then faster steps
        net = torch.compile(net)
    raw.train()
    amp = torch.autocast(ctx.device.type, torch.bfloat16,
                         enabled=ctx.device.type == "cuda" and args.precision == "bf16")
    log = os.path.join(args.out, "log.txt")
    if ctx.master and not args.resume:
        open(log, "w").close()                                  # a fresh run, a fresh log
    sums, n, t0 = {}, 0, time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.stage,
               disable=not ctx.master, mininterval=1.0)
    for step in bar:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        with amp:
            loss, info = loss_fn(net, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(),
                                               args.clip if args.clip > 0 else math.inf)
        opt.step()
        update_ema(ema, raw, args.ema)
        if hook is not None and ctx.master:
            hook(step + 1, ema)
        for k, v in dict(loss=loss.detach(), gnorm=gnorm, **info).items():
            sums[k] = sums.get(k, 0) + v.float()                    # on device: no sync
        n, done = n + 1, step + 1
        save_now = done % args.ckpt_every == 0 or done == args.steps
        if done % args.log_every and not save_now:
            continue
        avg = torch.stack(list(sums.values())) / n                  # one all_reduce per line
        if ctx.ddp:
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        avg = dict(zip(sums, avg.tolist()))
        if not all(map(math.isfinite, avg.values())):
            # NOTE: checked at log/checkpoint steps only (a per-step check would sync every
            # step); no checkpoint is written after the bad step, so the last one stays good.
            raise FloatingPointError(
                f"non-finite loss or gradient in steps {done - n + 1}..{done} ({avg}); stopped. "
                f"The last good checkpoint in {args.out} (step {saved_at}) is untouched: "
                f"resume it with a lower --lr or --clip.")
        ips = n * args.batch / (time.time() - t0)
        extra = " | ".join(f"{k} {v:.4g}" for k, v in avg.items() if k not in ("loss", "gnorm"))
        line = (f"step {done:07d} | loss {avg['loss']:.4f} | {extra} | gnorm {avg['gnorm']:.2f} | "
                f"lr {lr:.2e} | {ips:.0f} img/s | {peak_memory_gb(ctx.device):.2f} GB")
        history.append(dict(step=done, **avg))
        if ctx.master:
            bar.write(line)
            with open(log, "a") as f:
                print(line, file=f)
        if save_now:
            rngs = [rng_state(ctx, streams)]
            if ctx.ddp:
                rngs = [None] * ctx.world
                dist.all_gather_object(rngs, rng_state(ctx, streams))
            if ctx.master:
                save_checkpoint(args.out, raw, ema, meta, dict(
                    optimizer=opt.state_dict(), step=done, rng=rngs, history=history, **meta))
            saved_at = done
        sums, n, t0 = {}, 0, time.time()
    return raw, ema, history


# ------------------------------------------------------------------------------------------
# Stage: MAE pretraining of the feature encoder (App. A.3)
# ------------------------------------------------------------------------------------------
def cls_lambda(step, args):
    """The cls fine-tune weight: 0 before --cls-start, then a linear ramp to --cls-lambda."""
    if args.cls_start < 0 or step < args.cls_start:
        return 0.0
    return args.cls_lambda * min(1.0, (step - args.cls_start) / max(1, args.cls_ramp))


@torch.no_grad()
def mae_reconstruct(model, x, generator):
    """The masking of mae_loss, returning tensors: x (B, C_img, pH, pW) -> patched input, recon
    and mask, each (B, C, H, W) (the mask broadcast over channels; 1 = masked)."""
    x = patchify(x, model.cfg.input_patch_size)                 # (B, C, H, W)
    B, C, H, W = x.shape
    mask = patch_mask(B, H, W, model.cfg.patch_size, generator=generator, device=x.device)
    recon = model.decoder(model.encoder(x * (1 - mask))[0])     # (B, C, H, W)
    return x, recon, mask.expand(B, C, H, W)


@torch.no_grad()
def mae_eval(model, x, mean_image, seed):
    """Masked L2 (encoder.masked_l2) of the model's reconstruction of x, and of the per-pixel
    mean image on the same masks: the trivial baseline a useful MAE must beat."""
    xp, recon, mask = mae_reconstruct(model, x, torch.Generator(x.device).manual_seed(seed))
    mean = patchify(mean_image.expand_as(x), model.cfg.input_patch_size)   # (B, C, H, W)
    return (masked_l2(recon, xp, mask[:, :1]).mean().item(),
            masked_l2(mean, xp, mask[:, :1]).mean().item())


def load_data(args):
    """--data -> (images, labels): a tensor (MNIST-5k, in memory) or an on-demand source (the
    latent cache, memory-mapped; an image folder, decoded per step) with .get and .shape."""
    if args.data == "latents":
        images = LatentCache(args.data_path)
        return images, images.labels
    if args.data == "images":
        images = ImageFolder(args.data_path, args.image_size, augment=args.augment)
        return images, images.labels
    return mnist5k(args.data_path)


def sample_shape(images):
    return tuple(images.shape[1:]) if isinstance(images, torch.Tensor) else images.shape


def train_mae(args, ctx):
    if args.batch % ctx.world or args.holdout < 1:
        raise ValueError(f"--batch {args.batch} must divide by the {ctx.world} ranks and "
                         f"--holdout {args.holdout} must be >= 1 (the final evaluation)")
    images, labels = load_data(args)
    train_idx, held_idx = split_per_class(labels, args.holdout)
    held_idx = held_idx[::max(1, len(held_idx) // 1000)]      # evaluate at most ~1000 items
    cfg = MAEConfig(**MAE_models[args.mae_model])
    if sample_shape(images)[0] != cfg.in_channels:
        raise ValueError(f"--data {args.data} holds {sample_shape(images)} samples; --mae-model "
                         f"{args.mae_model} takes {cfg.in_channels} channels (latents: "
                         f"latent_256 / latent_640; MNIST: mnist)")
    torch.manual_seed(args.seed)                                # the same init on every rank
    model = MAEResNet(cfg)
    rank_seed = args.seed * ctx.world + ctx.rank
    torch.manual_seed(rank_seed)                                # masks: one stream per rank
    streams = {"data": TensorSampler(subset(images, train_idx), labels[train_idx], rank_seed)}
    meta = dict(kind="mae", config=json.dumps(asdict(cfg)), args=json.dumps(vars(args)),
                data=json.dumps(dict(data=args.data, path=args.data_path, holdout=args.holdout)))
    if ctx.master:
        print(f"MAE {args.mae_model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params | {len(train_idx)} train / {len(held_idx)} held-out images")

    def loss_fn(net, step):
        x, y = streams["data"].batch(args.batch // ctx.world)
        lam = cls_lambda(step, args)
        loss, info = net(x.to(ctx.device), y.to(ctx.device), lam)   # forward = mae_loss
        out = {"recon": info["recon_loss"]}
        if args.cls_start >= 0:
            out.update(cls=info["cls_loss"], acc=info["accuracy"],
                       lam=torch.tensor(lam, device=ctx.device))
        return loss, out

    raw, ema, history = fit(args, ctx, model, meta, streams, loss_fn)
    if not ctx.master:
        return None
    # Held-out digits, fixed masks: the EMA and raw weights against the mean-image baseline.
    pick = lambda idx: take(images, idx, torch.Generator())   # (flips: a fixed generator)
    x_held = pick(held_idx).to(ctx.device)
    mean_image = pick(train_idx[::max(1, len(train_idx) // 5000)]).mean(0).to(ctx.device)
    ema_loss, baseline = mae_eval(ema, x_held, mean_image, seed=10_001)
    raw_loss, _ = mae_eval(raw.eval(), x_held, mean_image, seed=10_001)
    summary = dict(step=args.steps, held_out=len(held_idx), ema_masked_l2=ema_loss,
                   raw_masked_l2=raw_loss, mean_image_masked_l2=baseline)
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        print(json.dumps(summary), file=f)
    print(f"held-out masked L2 (per masked location): EMA {ema_loss:.4f} | raw {raw_loss:.4f} | "
          f"mean-image baseline {baseline:.4f}")

    # Picture: one held-out digit per class; masked input (mask in blue), reconstruction
    # (visible pixels copied, masked ones predicted), original.
    if cfg.in_channels not in (1, 3):                           # latents: no picture
        return summary
    pick = x_held[::args.holdout][:10]                          # held-out is class-sorted
    x, recon, mask = mae_reconstruct(ema, pick, torch.Generator(ctx.device).manual_seed(1))
    p = cfg.input_patch_size
    x, recon, mask = unpatchify(x, p), unpatchify(recon, p), unpatchify(mask, p)
    rgb = lambda t: ((t.float() + 1) / 2).expand(-1, 3, -1, -1)  # C_img = 1 or 3
    blue = torch.tensor([0.25, 0.35, 0.65], device=x.device).view(1, 3, 1, 1)
    m = mask[:, :1]
    rows = [rgb(x) * (1 - m) + blue * m, rgb(x * (1 - m) + recon * m), rgb(x)]
    image_rows(rows, ["masked", "recon", "original"]).save(os.path.join(args.out, "mae.png"))
    if len(history) > 1:
        curve = ("train loss (masked L2)", [h["loss"] for h in history], (30, 90, 200))
        lines = [(f"held-out EMA {ema_loss:.3f}", ema_loss, (20, 160, 60)),
                 (f"mean-image baseline {baseline:.3f}", baseline, (200, 60, 40))]
        draw_curves([h["step"] for h in history], [curve], lines,
                    title=f"MAE {args.mae_model} on {args.data}").save(
            os.path.join(args.out, "mae_loss.png"))
    print(f"wrote {args.out}/mae.png, mae_loss.png, model.safetensors, train_state.pt, log.txt")
    return summary


# ------------------------------------------------------------------------------------------
# Stage: the generator (Sec. 3-4, Alg. 1, App. A.6-A.9; official train.py::train_step)
# ------------------------------------------------------------------------------------------
ALPHA_RANGE = (1.0, 4.0)        # CFG scales seen in training (official cfg_min, cfg_max)


def alpha_from_uniform(u, u_no_cfg, power, no_cfg_frac, lo=ALPHA_RANGE[0], hi=ALPHA_RANGE[1]):
    """CFG scale per group from two uniforms (official train_step): the inverse CDF of
    p(alpha) ~ alpha^-power on [lo, hi] at u, and alpha = 1 where u_no_cfg < no_cfg_frac."""
    k = 1.0 - power
    if abs(k) < 1e-6:                                           # p ~ 1/alpha: log-uniform
        alpha = lo * (hi / lo) ** u
    else:
        alpha = (lo ** k + u * (hi ** k - lo ** k)) ** (1.0 / k)
    return torch.where(u_no_cfg < no_cfg_frac, torch.ones_like(alpha), alpha)


def group_generator(seed, step, j):
    """The CPU generator of class group j at `step` (j = -1: the step's labels). Counter-based,
    as the official fold_in(rng, step): no state to save for --resume, and group j draws the
    same numbers whichever rank computes it (so 1 process == N processes)."""
    s = np.random.SeedSequence([seed, step, j + 1]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(s))


def draw_groups(sampler, cfg, args, step, groups):
    """Everything random in one step, for the global group indices `groups` (this rank's):
    labels (n,), alpha (n,), pos (n, N_pos, C, H, W), unc (n, N_unc, C, H, W), noise
    (n * N_neg, C, H, W) and style indices (n * N_neg, M); generated sample b * N_neg + g
    belongs to group b. NOTE: official labels follow the data (drawn from the last real batch,
    repeats possible); ours are distinct classes, uniform (the class-balanced loader of A.8)."""
    which = sampler.draw_classes(args.n_classes_per_step, group_generator(args.seed, step, -1))
    shape = (args.gen_per_label, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = []
    for j in groups:
        g = group_generator(args.seed, step, j)
        u = torch.rand(2, generator=g)
        alpha = alpha_from_uniform(u[:1], u[1:], args.cfg_power, args.no_cfg_frac)   # (1,)
        pos, unc = sampler.draw_group(which[j].item(), args.n_pos, args.n_unc, g)
        noise = torch.randn(shape, generator=g)                 # (N_neg, C, H, W)
        style = torch.randint(max(1, cfg.noise_classes), (args.gen_per_label, cfg.noise_coords),
                              generator=g)                      # (N_neg, M)
        out.append((alpha, pos, unc, noise, style))
    alpha, pos, unc, noise, style = (torch.stack(t) for t in zip(*out))
    labels = sampler.classes[which[list(groups)]]
    return labels, alpha.flatten(), pos, unc, noise.flatten(0, 1), style.flatten(0, 1)


def generator_loss(net, phi, labels, alpha, pos, unc, noise, style_idx=None,
                   taus=(0.2, 0.05, 0.02), all_reduce=None):
    """The loss of one step (official train_step's loss_fn), inputs as draw_groups returns them
    (n groups). Generated samples x = f(noise | label, alpha) are embedded by phi WITH gradient,
    the real ones (positives and unconditional negatives, one batch) without; each feature group
    (B, T, D) becomes n * T drift-loss rows, one per (class group, token). Returns (loss = sum
    over feature groups of the mean row loss, {group: loss}, {tau: mean over groups of the
    un-normalized mean V_tau^2}, the number to watch: App. A.6)."""
    n, N_pos, N_unc = pos.shape[0], pos.shape[1], unc.shape[1]
    N_neg = noise.shape[0] // n
    embed = (lambda x: feature_groups(phi, x, **ACTIVATION_KWARGS)) if isinstance(
        phi, MAEResNet) else phi                                # pixel models: MAE + ConvNeXt
    # App. A.7: unconditional negatives weighted w = (alpha - 1)(N_neg - 1) / N_unc (-1: self-mask)
    w_unc = (alpha.float() - 1) * (N_neg - 1) / max(1, N_unc)                      # (n,)
    with torch.no_grad():
        real = embed(torch.cat([pos, unc], 1).flatten(0, 1))  # name -> (n (N_pos+N_unc), T, D)
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
                                    taus=taus, all_reduce=all_reduce)               # (n * T,)
        per_group[name] = row_loss.mean()
        loss = loss + per_group[name]
        for tau in taus:
            V2[tau] = V2[tau] + info[f"loss_{tau}"] / len(gen)
    return loss, per_group, V2


def sum_over_ranks(t):
    """drift_loss's all_reduce: its per-group statistics are means over ALL rows of ALL ranks."""
    dist.all_reduce(t)
    return t


@torch.no_grad()
def sample_grid(model, classes, n, alpha, seed, device):
    """One row per class of n samples of `model` (the EMA), the same noise every time it is
    called (a fixed generator, not the global RNG: resume stays exact). Pixel data only."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    rows = []
    for c in classes:
        noise = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        style = model.draw_style(n, g)
        x = model(noise.to(device), torch.full((n,), c, device=device), alpha,
                  style_idx=style.to(device))                   # (n, C, H, W) in [-1, 1]
        rows.append(((x.float() + 1) / 2).expand(-1, 3, -1, -1))
    return image_rows(rows, [f"class {c}" for c in classes])


def train_gen(args, ctx):
    preset = GEN_PRESET.get(args.model, args.model)
    cfg = DriftDiTConfig(**DriftDiT_models[preset])
    if args.n_classes_per_step % ctx.world:
        raise ValueError(f"--n-classes-per-step {args.n_classes_per_step} must divide by the "
                         f"{ctx.world} ranks (each class group lives whole on one rank)")
    images, labels = load_data(args)
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if sample_shape(images) != want or labels.max() >= cfg.num_classes:
        raise ValueError(f"--data {args.data} holds {sample_shape(images)} samples of "
                         f"{labels.max() + 1} classes; --model {args.model} makes {want} of "
                         f"{cfg.num_classes} classes (MNIST: --model S4)")
    if not args.mae_ckpt:
        raise ValueError("--mae-ckpt: the generator needs a trained feature encoder (a run of "
                         "train.py --stage mae, or an official MAE through convert.py)")
    mae_config, mae_state, _ = read_checkpoint(args.mae_ckpt, "mae")     # its EMA weights
    phi = mae_from_state(mae_config, mae_state, encoder_only=True)
    phi = phi.to(ctx.device).requires_grad_(False).eval()       # frozen; x still gets grads
    phi_params = sum(p.numel() for p in phi.parameters())
    if args.model in ("B16", "L16") and not args.convnext:
        raise ValueError(f"--model {args.model} (pixels) uses ConvNeXt-V2 features beside the "
                         f"MAE: pass --convnext PATH (model.safetensors of "
                         f"facebook/convnextv2-base-22k-224)")
    if args.convnext:                                           # pixel models: two encoders
        if cfg.in_channels != 3:
            raise ValueError(f"--convnext takes RGB pixels; --model {args.model} makes "
                             f"{cfg.in_channels}-channel samples")
        convnext = convnext_from_hf(args.convnext, args.convnext_model).to(ctx.device)
        phi_params += sum(p.numel() for p in convnext.parameters())
        mae = phi
        phi = lambda x: pixel_feature_groups(mae, convnext, x, **ACTIVATION_KWARGS)
    torch.manual_seed(args.seed)                                # the same init on every rank
    model = DriftDiT(cfg)
    sampler = TensorSampler(images, labels, args.seed)
    per_rank = args.n_classes_per_step // ctx.world
    mine = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)    # global group indices
    reduce = sum_over_ranks if ctx.ddp else None
    meta = dict(kind="gen", config=json.dumps(asdict(cfg)), args=json.dumps(vars(args)),
                data=json.dumps(dict(data=args.data, path=args.data_path, mae=args.mae_ckpt,
                                     convnext=args.convnext)))
    grid_classes = sampler.classes[:10].tolist()
    if ctx.master:
        print(f"DriftDiT {preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params | phi {phi_params / 1e6:.2f}M ({args.mae_ckpt}"
              f"{' + ' + args.convnext if args.convnext else ''}) | {len(labels)} images, "
              f"{len(sampler.classes)} classes | "
              f"{per_rank} groups x ({args.gen_per_label} gen, {args.n_pos} pos, {args.n_unc} "
              f"unc) per rank")

    def loss_fn(net, step):
        batch = [t.to(ctx.device) for t in draw_groups(sampler, cfg, args, step, mine)]
        loss, _, V2 = generator_loss(net, phi, *batch, taus=args.taus, all_reduce=reduce)
        return loss, {f"V2_{tau}": v for tau, v in V2.items()}

    def grid(done, ema):
        if done == args.steps or (args.sample_every > 0 and done % args.sample_every == 0):
            sample_grid(ema, grid_classes, 10, args.sample_alpha, 1, ctx.device).save(
                os.path.join(args.out, "samples.png"))

    raw, ema, history = fit(args, ctx, model, meta, {}, loss_fn,
                            hook=grid if cfg.out_channels in (1, 3) else None)
    if not ctx.master:
        return None
    if len(history) > 1:
        colors = [(200, 60, 40), (30, 90, 200), (20, 160, 60), (120, 60, 160)]
        curves = [(f"mean V^2, tau {tau}", [h[f"V2_{tau}"] for h in history], colors[i % 4])
                  for i, tau in enumerate(args.taus)]
        draw_curves([h["step"] for h in history], curves,
                    title=f"DriftDiT {args.model} on {args.data}: mean V^2 per tau "
                          f"(averaged over feature groups)").save(
            os.path.join(args.out, "loss.png"))
    summary = dict(step=args.steps, **{k: v for k, v in history[-1].items() if k != "step"})
    print(f"wrote {args.out}/samples.png, loss.png, model.safetensors, train_state.pt, log.txt")
    return summary


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.stage == "toy":
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(vars(args)))
        return train_toy(args)
    ctx = init_distributed(args.device)
    if ctx.master:
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(vars(args)))
        name = args.stage + (f" --model {args.model}" if args.stage == "gen" else "")
        print(f"recipe {name}: {recipe(args.stage, args.model)} (flags given override it)")
    if ctx.ddp:
        dist.barrier()                                          # --out exists for every rank
    summary = (train_mae if args.stage == "mae" else train_gen)(args, ctx)
    if ctx.ddp:
        dist.barrier()                                          # rank 0 finished its pictures
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
