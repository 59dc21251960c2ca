"""
One-step sampling from a Drifting Model generator: x = f(eps | y, alpha), one forward pass.

Two modes (DiT's sample.py + sample_ddp.py in one file):
- grid: a PNG, one row per class (--classes), --per-class samples each.
- --num-samples N: an ADM-evaluator-compatible .npz (arr_0: uint8 NHWC; labels), with the
  paper's protocol (Sec. 5.2): the same number of samples per class, EMA weights, images
  clipped to [0, 1] and turned to uint8 as x255 with truncation. Sample i has label
  i % num_classes and its own seed (seed, i) for noise and style indices, so the file is the
  same for any number of processes and any batch size.
Latent checkpoints (32x32x4 outputs) decode through the SD-VAE of vae.py: pass --vae with the
sd-vae-ft-mse weights file (diffusion_pytorch_model.safetensors); pixel checkpoints need none.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Sec. 4, 5.2.
Grid:   python sample.py --ckpt runs/mnist/model.safetensors --classes 0 1 2 3 --cfg 1.0
Latent: python sample.py --ckpt runs/L2/model.safetensors --cfg 1.0 --vae sd-vae-ft-mse/
FID:    torchrun --standalone --nproc_per_node=8 sample.py --ckpt X --num-samples 50000
        python fid.py calc --weights W.pth --samples samples.npz --ref ref_stats.npz
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import read_checkpoint, save_checkpoint, write_atomic
from encoder import mae_picture
from metrics import mae_heldout
from models import DriftDiT
from vae import load_vae

GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py picks (1000 classes)
LATENT_CHANNELS = 4  # SD-VAE latents (models.py _LATENT); pixel models have 1 or 3 channels


def load_checkpoint(path, device="cpu", ema=True):
    """A run folder or model.safetensors of kind "gen" -> DriftDiT in eval mode (EMA weights
    when the file has them, unless ema=False)."""
    config, sd, _ = read_checkpoint(path, "gen", ema, device)
    odd = next((k for k, v in sd.items() if v.is_floating_point() and v.dtype != torch.float32),
               None)
    if odd:                     # our generators are float32 (autocast casts where it runs)
        raise ValueError(f"{path}: tensor {odd!r} is {sd[odd].dtype}, not float32: not a "
                         f"DriftDiT checkpoint of this code (convert.py writes float32)")
    try:
        with torch.device("meta"):  # no init work: every tensor comes from the file
            model = DriftDiT.from_config(config)
        model.load_state_dict(sd, assign=True)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:  # not DriftDiT's
        raise ValueError(f"{path}: not a DriftDiT generator checkpoint ({e})") from e
    return model.eval()


def load_generator(path, device, ema=True, vae=None):
    """The DriftDiT of a run folder / model.safetensors (EMA weights unless ema=False)."""
    model = load_checkpoint(path, device, ema)
    if model.cfg.out_channels == LATENT_CHANNELS and vae is None:
        raise ValueError(f"{path}: a latent model ({LATENT_CHANNELS}-channel output) needs the "
                         f"SD-VAE decoder: pass --vae PATH (sd-vae-ft-mse's "
                         f"diffusion_pytorch_model.safetensors, see vae.py)")
    if vae is not None and vae.cfg.latent_channels != model.cfg.out_channels:
        raise ValueError(f"{path}: --vae given, but the model's {model.cfg.out_channels}-channel "
                         f"output is not the VAE's {vae.cfg.latent_channels}-channel latent "
                         f"(a pixel model needs no --vae)")
    return model


def decode(x, vae=None):
    """Generator output (B, C, H, W) -> uint8 images (B, H, W, C'). Pixel outputs are in
    [-1, 1]; latents (x VAE_SCALE, as the training cache) go through the SD-VAE decoder first,
    in float32. Official _to_uint8: NaN -> 0, clip to [0, 1], x255, truncate."""
    if vae is not None:
        x = vae.decode(x)                                                   # (B, 3, 8H, 8W)
    x = ((x.float() + 1) / 2).nan_to_num(0.0, 1.0, 0.0).clamp(0, 1)        # (B, C', H', W')
    return (x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()             # truncation


@torch.no_grad()
def generate(model, index, labels, alpha, seed, device):
    """Samples for global indices `index` (list) with `labels` (B,): sample i's noise and style
    indices come from its own CPU generator seeded (seed, i), so no batching changes them."""
    cfg, noise, style = model.cfg, [], []
    for i in index:
        g = torch.Generator().manual_seed((seed << 32) + i)
        noise.append(torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g))
        if len(model.style_embeds):
            style.append(model.draw_style(1, g)[0])                         # (M,)
    noise = torch.stack(noise).to(device)                                   # (B, C, H, W)
    style = torch.stack(style).to(device) if style else None               # (B, M)
    return model(noise, labels.to(device), alpha, style_idx=style)          # (B, C, H, W)


def save_grid(images, rows, path, pad=2, scale=1):
    """uint8 (rows * cols, H, W, C) -> one PNG, a row per class (grayscale when C = 1), each
    pixel drawn as scale x scale (nearest: small digits stay readable)."""
    from PIL import Image
    n, H, W, C = images.shape
    cols = n // rows
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, np.uint8)
    for k, im in enumerate(images.numpy()):
        y, x = pad + k // cols * (H + pad), pad + k % cols * (W + pad)
        grid[y:y + H, x:x + W] = im
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid[..., 0] if C == 1 else grid).save(path)


def save_curves(path, series, title="", ylabel="", logy=True):
    """Line plot of named series {name: (steps, values)} to a PNG (matplotlib): the training
    curves of toy.py and train.py."""
    import matplotlib
    matplotlib.use("Agg")                                            # files only, no window
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, (steps, values) in series.items():
        ax.plot(steps, values, label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if logy else "linear")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# train.py's pictures: the grid and EMA snapshots during a run, the curves at its end
# ------------------------------------------------------------------------------------------
def pictures(args, out, ema, s, done, device):
    """Rank 0, --stage gen: the EMA's sample grid (a row per class, fixed seeds) every
    --sample-every steps and at the end; its weights in snapshots/ every --snapshot-every."""
    if s.cfg.out_channels in (1, 3) and (
            done == args.steps or args.sample_every > 0 and done % args.sample_every == 0):
        lab = s.sampler.classes[:10].repeat_interleave(10)
        x = generate(ema, list(range(len(lab))), lab, args.sample_alpha, 1, device)
        save_grid(decode(x), len(lab) // 10, os.path.join(out, "samples.png"), scale=2)
    if args.snapshot_every and done % args.snapshot_every == 0:      # EMA only: fid.py steps
        save_checkpoint(ema, os.path.join(out, "snapshots", f"ema_{done:07d}"
                                          ".safetensors"), step=done)


def finish_gen(args, out, history):
    """The V^2 curves per tau (loss.png) and, with --eval-every, FD_MAE and FD_pix (fd_mae.png)."""
    steps_logged = [h["step"] for h in history]
    save_curves(os.path.join(out, "loss.png"), {f"tau {t}": (steps_logged, [
        h[f"V2_{t}"] for h in history]) for t in args.taus}, title=f"DriftDiT {args.model}"
        f" on {args.data}", ylabel="mean V^2 per tau (over feature groups)")
    fd = [h for h in history if "fd_mae" in h]
    if fd:                          # the metrics that move while V^2 stays flat
        save_curves(os.path.join(out, "fd_mae.png"), {
            "FD_MAE (MAE layer-4 means, 256-d)": ([h["step"] for h in fd],
                                                 [h["fd_mae"] for h in fd]),
            "FD_pix / 100 (pooled pixels)": ([h["step"] for h in fd],
                                             [h["fd_pix"] / 100 for h in fd])},
            title=f"{args.model} on {args.data}: {args.eval_n}/class EMA vs "
            f"{args.holdout}/class held out", ylabel="Frechet distance")


def finish_mae(args, out, raw, ema, s, history, device):
    """The held-out evaluation (metrics.mae_heldout) in log.txt; the loss curve beside it, and
    one held-out item per class masked, reconstructed and as it was (mae.png)."""
    summary, x_held = mae_heldout(raw, ema, s.images, s.train_idx, s.held_idx, device)
    summary = dict(step=args.steps, **summary)
    with open(os.path.join(out, "log.txt"), "a") as f:
        print(json.dumps(summary), file=f)
    ema_l2, baseline = summary["ema_masked_l2"], summary["mean_image_masked_l2"]
    print(f"held-out masked L2 (per masked location): EMA {ema_l2:.4f} | raw "
          f"{summary['raw_masked_l2']:.4f} | mean-image baseline {baseline:.4f}")
    steps_logged = [h["step"] for h in history]
    save_curves(os.path.join(out, "mae_loss.png"), {
        "train loss (masked L2)": (steps_logged, [h["loss"] for h in history]),
        f"held-out EMA {ema_l2:.3f}": (steps_logged, [ema_l2] * len(history)),
        f"mean-image baseline {baseline:.3f}": (steps_logged, [baseline] * len(history))},
        title=f"MAE {args.mae_model} on {args.data}", ylabel="masked L2")
    if s.cfg.in_channels in (1, 3):
        save_grid(decode(mae_picture(ema, x_held[::args.holdout][:10])), 3,
                  os.path.join(out, "mae.png"), scale=3)
    return summary


def parse_args(argv=None):
    """The flags, each checked here, before any work: a bad flag would otherwise crash
    anonymously or write another file than --out (np.savez adds .npz, PIL needs an extension
    to pick a format). args.out is resolved (samples.png / samples.npz)."""
    p = argparse.ArgumentParser(description=__doc__,  # --help shows the commands
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder or model.safetensors (kind gen)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--cfg", type=float, default=1.0, help="CFG scale alpha (1.0 = no guidance)")
    p.add_argument("--classes", type=int, nargs="+", help="grid rows (default: 0..9 or DiT's 8)")
    p.add_argument("--per-class", type=int, default=8, help="grid columns")
    p.add_argument("--scale", type=int, default=1, help="grid: each pixel drawn scale x scale")
    p.add_argument("--num-samples", type=int, default=0, help="write N samples to .npz (0 = grid)")
    p.add_argument("--batch", type=int, default=64, help="samples per forward, per process")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed (seed, i)")
    p.add_argument("--vae", help="SD-VAE weights for latent models: sd-vae-ft-mse's "
                   "diffusion_pytorch_model.safetensors or its folder (vae.py)")
    p.add_argument("--out", help="output file (default samples.png / samples.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    for flag in ("per_class", "batch", "scale"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be > 0")
    if args.num_samples < 0:
        p.error(f"--num-samples {args.num_samples}: must be >= 0 (0 = a grid)")
    if not math.isfinite(args.cfg):
        p.error(f"--cfg {args.cfg}: the CFG scale must be a finite number (1.0 = no guidance)")
    out = args.out = args.out or ("samples.npz" if args.num_samples else "samples.png")
    ext = os.path.splitext(out)[1].lower()
    if args.num_samples and ext != ".npz":
        p.error(f"--out {out}: --num-samples writes an .npz; name it e.g. samples.npz")
    if not args.num_samples:
        from PIL import Image
        if ext not in {e for e, f in Image.registered_extensions().items() if f in Image.SAVE}:
            p.error(f"--out {out}: a grid is an image; name it e.g. samples.png (or .jpg)")
    if os.path.exists(out) and not args.overwrite:
        p.error(f"--out {out} exists; pass --overwrite to replace it, or another --out")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        p.error(f"--out {out}: no folder {os.path.dirname(out)!r}; create it first")
    return args


def draw_all(model, mine, label_of, args, device, vae, ddp):
    """This rank's samples `mine` (global indices), in batches -> uint8 (n_rank, H, W, C).
    A NaN or inf sample on any rank: every rank fails together, nothing written."""
    parts, bad = [], torch.zeros(2, dtype=torch.long, device=device)
    for b in tqdm(range(0, len(mine), args.batch), desc="sampling",
                  disable=os.environ.get("RANK", "0") != "0"):
        index = mine[b:b + args.batch]
        labels = torch.tensor([label_of(i) for i in index])
        x = generate(model, index, labels, args.cfg, args.seed, device)     # (B, C, H, W)
        # Checked before decode, whose NaN -> 0 (the official _to_uint8) would write black images
        n_bad = (~x.isfinite()).flatten(1).any(1).sum()
        bad += torch.stack([n_bad, torch.tensor(len(index), device=device)])
        if n_bad:
            break  # this rank stops; the count is shared below so every rank fails together
        parts.append(decode(x, vae))
    if ddp:
        dist.all_reduce(bad)                            # also the barrier after sampling
    if bad[0]:
        raise ValueError(f"{args.ckpt}: {bad[0].item()} of {bad[1].item()} samples drawn are "
                         f"NaN or inf, nothing written; the checkpoint's weights are broken: try "
                         f"{'the EMA (no --raw)' if args.raw else '--raw'}, a smaller --cfg or "
                         f"an earlier checkpoint")
    return torch.cat(parts) if parts else None


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    torch.set_grad_enabled(False)  # inference only (here, not at import: tests import this file)
    ddp = "RANK" in os.environ  # torchrun
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    vae = load_vae(args.vae, device) if args.vae else None
    model = load_generator(args.ckpt, device, ema=not args.raw, vae=vae)
    K = model.cfg.num_classes
    if rank == 0:
        print(json.dumps({"args": vars(args), "model": asdict(model.cfg)}))

    if args.num_samples:  # the .npz for fid.py / the ADM evaluator
        N = args.num_samples
        if N % K or N < world:
            raise ValueError(f"--num-samples {N}: not a multiple of the {K} classes "
                             f"(or fewer than the {world} processes)")
        mine = list(range(rank, N, world))  # rank r: samples r, r + world, ...
    else:
        classes = args.classes or (list(range(K)) if K <= 10 else GRID_CLASSES)
        if max(classes) >= K or min(classes) < 0:
            raise ValueError(f"--classes {classes}: the model has classes 0..{K - 1}")
        N = len(classes) * args.per_class
        mine = list(range(N)) if rank == 0 else []
    label_of = (lambda i: i % K) if args.num_samples else (lambda i: classes[i // args.per_class])
    t0 = time.time()
    images = draw_all(model, mine, label_of, args, device, vae, ddp)        # (n_rank, H, W, C)
    if rank == 0:
        dt = time.time() - t0
        print(f"{N} samples in {dt:.1f} s: {N / dt:.1f} img/s over {world} process(es)")

    if not args.num_samples:
        if rank == 0:
            write_atomic(out, lambda tmp: save_grid(images, len(classes), tmp, scale=args.scale))
    else:  # each rank's share goes through a file: no 10 GB collective for 50k ImageNet images
        parts = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}"
                             ".parts")                  # hidden, of its own: no user file hit
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)   # a killed run's
            os.makedirs(parts)
        try:
            if ddp:
                dist.barrier()
            np.save(os.path.join(parts, f"{rank}.npy"), images.numpy())
            if ddp:
                dist.barrier()
            if rank == 0:
                arr = np.empty((N, *images.shape[1:]), np.uint8)
                for r in range(world):                              # sample r + world*j
                    arr[r::world] = np.load(os.path.join(parts, f"{r}.npy"))
                write_atomic(out, lambda tmp: np.savez(tmp, arr_0=arr, labels=np.arange(N) % K))
        finally:                # also on a full disk: no partial part left to keep it full
            if rank == 0:
                shutil.rmtree(parts, ignore_errors=True)
    if rank == 0:
        print(f"wrote {out}")
    if ddp:
        dist.destroy_process_group()


def cli(run=None, name="sample.py"):
    """main() with errors as one line (no traceback), printed once under torchrun: every rank
    meets the same bad input, so only rank 0 reports it and the others exit 1 silently.
    run: the main to call (default this file's; fid.py passes its own)."""
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        (run or main)()
    except KeyboardInterrupt:
        if not quiet:
            print(f"{name}: interrupted (nothing written)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        sys.exit(1 if quiet else f"{name}: error: {e}")


if __name__ == "__main__":
    cli()
