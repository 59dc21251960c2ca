"""
Train a Drifting Model or its feature encoder. One loop, one file, no framework.

Stages:
  toy   a 2-D MLP generator on a toy distribution with the simple kernel field (Sec. 5.1,
        Fig. 3-4; the official toy notebook). Runs on a laptop CPU in about a minute.
  mae   the feature encoder phi: a ResNet masked autoencoder (App. A.3), optionally ending with
        the classification fine-tune. Plain python or torchrun (DDP), CPU or GPU (bf16).

    python train.py                                  # toy checkerboard -> runs/toy/
    python train.py --data swiss_roll --out runs/toy_swiss
    python train.py --data bimodal --init far        # Fig. 3: start far from both modes
    # MAE on MNIST-5k, CPU, ~4 min on 2 cores (held-out masked L2 0.033 vs 0.28 mean image):
    python train.py --stage mae --steps 800 --batch 64 --warmup 50 --ema 0.99 \\
        --log-every 50 --ckpt-every 200 --out runs/mae_mnist
    python train.py --stage mae --steps 1600 ... --out runs/mae_mnist --resume  # continue
    torchrun --standalone --nproc_per_node=2 train.py --stage mae ...          # DDP (gloo/nccl)

The flag defaults shown by --help are the toy stage's; --stage mae starts from RECIPES["mae"]
(the paper's MAE recipe, App. A.3) and any flag given overrides it.
Checkpoint (mae) in --out: model.safetensors (weights under their names, the EMA under "ema/";
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

from data import TOY_DATA, TensorSampler, mnist5k, split_per_class
from encoder import MAE_models, MAEConfig, MAEResNet, masked_l2, patch_mask, patchify, unpatchify
from field import drift_field
from models import MLP
from models import save_checkpoint as save_weights

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--stage", choices=["toy", "mae"], default="toy", help="what to train")
parser.add_argument("--out", default="runs/toy", help="run folder (log, pictures, checkpoint)")
parser.add_argument("--seed", type=int, default=0, help="global seed (rank r uses seed*world+r)")
parser.add_argument("--device", default="cpu",
                    help="cpu | cuda | auto (cuda if available); torchrun uses cuda:LOCAL_RANK")
parser.add_argument("--data", default="checkerboard",
                    help=f"toy: one of {list(TOY_DATA)}; mae: mnist5k")
parser.add_argument("--data-path", default=None, help="file of --data (default: built-in copy)")
parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (total, on resume)")
parser.add_argument("--batch", type=int, default=1024,
                    help="toy: generated samples per step (the notebook uses 2048; 1024 with the "
                         "cosine lr reaches the same quality in half the time on a CPU); "
                         "mae: global batch, split over the ranks")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam/AdamW)")
parser.add_argument("--lr-decay", choices=["none", "cosine"], default="cosine",
                    help="after warmup: constant (the paper's) or cosine to 0 (the toy's: it "
                         "removes the last optimizer jitter; the notebook keeps it constant)")
parser.add_argument("--warmup", type=int, default=0, help="linear lr warmup steps from 1e-6")
parser.add_argument("--log-every", type=int, default=100, help="log interval in steps")
# toy stage (defaults: the official notebook's, except --batch/--n-pos/--lr-decay)
parser.add_argument("--n-pos", type=int, default=1024, help="toy: data samples per step")
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
parser.add_argument("--cls-start", type=int, default=-1,
                    help="mae: step where the cls fine-tune starts (-1 = never; the official "
                         "MAE-640 starts it 3k steps before the end)")
parser.add_argument("--cls-ramp", type=int, default=1000, help="mae: steps of the lambda ramp")
parser.add_argument("--cls-lambda", type=float, default=0.1,
                    help="mae: final lambda of lambda*L_cls + (1-lambda)*L_rec")
parser.add_argument("--holdout", type=int, default=50,
                    help="mae on mnist5k: digits per class held out for the final evaluation")

# Per-stage starting values (the parser's defaults are the toy's). mae: the paper's recipe,
# App. A.3 / configs/mae/latent_ablation_256.yaml (batch 8192, 30k steps, warmup 4k, constant lr).
RECIPES = {"toy": {},
           "mae": dict(out="runs/mae", data="mnist5k", device="auto", steps=30000, batch=8192,
                       lr=4e-3, lr_decay="none", warmup=4000)}
DATA = {"toy": list(TOY_DATA), "mae": ["mnist5k"]}


def parse_args(argv=None):
    """The stage's recipe fills the namespace first, so argparse only sets what it lacks."""
    stage = parser.parse_known_args(argv)[0].stage          # a peek; the strict parse follows
    args = parser.parse_args(argv, namespace=argparse.Namespace(**RECIPES[stage]))
    if args.data not in DATA[stage]:
        parser.error(f"--stage {stage} takes --data from {DATA[stage]}, not {args.data!r} "
                     f"(ImageNet latent caches and image folders arrive with a later issue)")
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
    state = torch.load(os.path.join(run_dir, "train_state.pt"), map_location="cpu",
                       weights_only=True)
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
def fit(args, ctx, raw, meta, streams, loss_fn):
    """loss_fn(model, step) -> (loss, info: dict of detached scalar tensors) draws its own batch
    from `streams` (name -> object with state_dict / load_state_dict, saved per rank).
    Returns (raw, ema, history: one dict of averages per log line)."""
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
        else:
            print0(f"NOTE: saved with {len(state['rng'])} ranks, resumed on {ctx.world}: fresh "
                   f"data and mask streams, not an exact continuation")
        print0(f"resumed {args.out} at step {start}")
    else:
        update_ema(ema, raw, 0.0)
    net = DDP(raw, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.ddp else raw
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
        extra = " | ".join(f"{k} {v:.4f}" for k, v in avg.items() if k not in ("loss", "gnorm"))
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


def train_mae(args, ctx):
    if args.batch % ctx.world or args.holdout < 1:
        raise ValueError(f"--batch {args.batch} must divide by the {ctx.world} ranks and "
                         f"--holdout {args.holdout} must be >= 1 (the final evaluation)")
    images, labels = mnist5k(args.data_path)
    train_idx, held_idx = split_per_class(labels, args.holdout)
    cfg = MAEConfig(**MAE_models[args.mae_model])
    torch.manual_seed(args.seed)                                # the same init on every rank
    model = MAEResNet(cfg)
    rank_seed = args.seed * ctx.world + ctx.rank
    torch.manual_seed(rank_seed)                                # masks: one stream per rank
    streams = {"data": TensorSampler(images[train_idx], labels[train_idx], rank_seed)}
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
    x_held = images[held_idx].to(ctx.device)
    mean_image = images[train_idx].mean(0).to(ctx.device)       # (C_img, pH, pW)
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
    pick = x_held[::args.holdout]                               # held-out is class-sorted
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
        print(f"recipe {args.stage}: {RECIPES[args.stage]} (flags given override it)")
    if ctx.ddp:
        dist.barrier()                                          # --out exists for every rank
    summary = train_mae(args, ctx)
    if ctx.ddp:
        dist.barrier()                                          # rank 0 finished its pictures
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
