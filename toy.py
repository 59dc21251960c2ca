"""
Drifting Models in 2-D: an MLP generator trained with the kernel drift field alone.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Sec. 5.1, Fig. 3-4; the
official toy notebook (lambertae.github.io/projects/drifting). The whole method in one loop:
    x = f(eps)                                   generated points, (N, 2)
    V = drift_field(x, y_data, x, tau)           V+ (pull toward data) - V- (push from x)
    loss = mse(x, stopgrad(x + V))               Eq. (6): its value is mean ||V||^2 / 2
Quality: the energy distance to held-out data, next to the same number for two real sets
(the noise floor), printed at the end and drawn as a curve.

    python toy.py                                          # checkerboard -> runs/toy/
    python toy.py --data swiss_roll --out runs/toy_swiss
    python toy.py --data bimodal --init far --out runs/toy_far    # Fig. 3: a far start

The paper's ablation tables on this toy (Tab. 1, 2, 11): ablate.py toy.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import save_checkpoint
from field import drift_field
from models import MLP
from sample import save_curves


# ------------------------------------------------------------------------------------------
# Toy distributions p: (n, 2) points in about [-1, 1]^2, seeded by a torch.Generator
# ------------------------------------------------------------------------------------------
def checkerboard(n, generator=None, noise=0.05):
    """Uniform on the 8 dark cells (i + j even) of a 4x4 board on [-1, 1]^2."""
    parity = torch.randint(0, 2, (n,), generator=generator)          # which diagonal family
    i = 2 * torch.randint(0, 2, (n,), generator=generator) + parity  # column 0..3
    j = 2 * torch.randint(0, 2, (n,), generator=generator) + parity  # row 0..3, i + j even
    cell = torch.stack([i, j], dim=1).float()                        # (n, 2)
    pts = (cell + torch.rand(n, 2, generator=generator)) * 0.5 - 1.0  # (n, 2) in [-1, 1]^2
    return pts + noise * torch.randn(n, 2, generator=generator)


def swiss_roll(n, generator=None, noise=0.03):
    """A 2-D spiral t (cos t, sin t), t in [pi/2, 9pi/2], scaled into [-1, 1] (the notebook's)."""
    t = math.pi * (0.5 + 4.0 * torch.rand(n, generator=generator))  # (n,)
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)   # (n, 2)
    # NOTE: the notebook divides by the batch's own max |coordinate|; we divide by its
    # population value (t = 9pi/2) so that every batch has the same scale.
    return pts / (4.5 * math.pi) + noise * torch.randn(n, 2, generator=generator)


def bimodal(n, generator=None, std=0.2):
    """Two equal Gaussian modes at (-1, 0) and (1, 0): the target of the paper's Fig. 3."""
    side = 2.0 * torch.randint(0, 2, (n, 1), generator=generator).float() - 1.0
    centers = torch.cat([side, torch.zeros_like(side)], dim=1)       # (n, 2)
    return centers + std * torch.randn(n, 2, generator=generator)


TOY_DATA = {"checkerboard": checkerboard, "swiss_roll": swiss_roll, "bimodal": bimodal}


@torch.no_grad()
def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic, float64). For two independent
    samples of size n from the same law its expectation is 2 E|X-X'| / n: the noise floor."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean()
            - torch.cdist(y, y).mean()).item()


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", choices=list(TOY_DATA), default="checkerboard", help="target p")
parser.add_argument("--out", default="runs/toy", help="run folder (pictures, weights, log)")
parser.add_argument("--steps", type=int, default=2000, help="Adam steps (the notebook's 2000)")
parser.add_argument("--batch", type=int, default=1024, help="generated points per step")
parser.add_argument("--n-pos", type=int, default=1024, help="data points per step")
parser.add_argument("--tau", type=float, default=0.05, help="kernel temperature (Eq. 12)")
parser.add_argument("--kernel-norm", choices=["both", "y", "none", "per_set", "sinkhorn"],
                    default="both", help="kernel normalization (Tab. 11); both = Eq. (17), "
                    "official; sinkhorn = arXiv:2603.12366")
parser.add_argument("--sinkhorn-iters", type=int, default=20, help="--kernel-norm sinkhorn: "
                    "alternating normalizations")
parser.add_argument("--kernel", choices=["laplace", "gaussian"], default="laplace",
                    help="exp(-|x-y|/tau) (Eq. 12) or exp(-|x-y|^2/(2 tau^2))")
parser.add_argument("--attract", type=float, default=1.0, help="a in V = a V+ - b V- (Tab. 1)")
parser.add_argument("--repel", type=float, default=1.0, help="b in V = a V+ - b V- (Tab. 1)")
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine to 0")
parser.add_argument("--init", choices=["default", "far", "collapsed"], default="default",
                    help="Fig. 3 starts: far = all points near (3, 3), collapsed = near (1, 0)")
parser.add_argument("--frames", default="0,50,100,200,400,800,1400,2000", help="steps drawn "
                    "in toy_evolution.png, each in 0..--steps (the default's past it: dropped)")
parser.add_argument("--eval-n", type=int, default=5000, help="points for the energy distance")
parser.add_argument("--log-every", type=int, default=100, help="steps between log lines")
parser.add_argument("--seed", type=int, default=0, help="model, noise and data seed")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
POSITIVE = ("steps", "batch", "n_pos", "eval_n", "log_every", "tau", "lr", "sinkhorn_iters")


def parse_args(argv=None):
    """parser.parse_args, then every check that must pass before anything is written."""
    args = parser.parse_args(argv)
    for name in (n for n in POSITIVE if not getattr(args, n) > 0):       # NaN fails too
        parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.frames != parser.get_default("frames") and not all(
            s.strip().isdecimal() and int(s) <= args.steps for s in args.frames.split(",")):
        parser.error(f"--frames {args.frames}: expected comma-separated steps in 0..{args.steps}")
    if not (args.attract >= 0 and args.repel >= 0):                  # NaN fails too
        parser.error(f"--attract {args.attract} --repel {args.repel}: scales must be >= 0")
    old = [f for f in ("log.txt", "model.safetensors") if os.path.exists(f"{args.out}/{f}")]
    if old and not args.overwrite:
        parser.error(f"--out {args.out} holds another run {old}; toy runs are short (no "
                     f"--resume): pass --overwrite or a new --out")
    return args


def train(args):
    """Train, evaluate, draw; returns the summary dict that log.txt ends with."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")                                        # files only, no window
    os.makedirs(args.out, exist_ok=True)
    device, sample = torch.device(args.device), TOY_DATA[args.data]
    torch.manual_seed(args.seed)
    g_data = torch.Generator().manual_seed(args.seed + 1)            # training data stream
    model = MLP().to(device)
    with torch.no_grad():  # Fig. 3 initializations: move the start, keep the architecture
        if args.init != "default":
            model.net[-1].weight.mul_(0.01)
            model.net[-1].bias.copy_(torch.tensor([3.0, 3.0] if args.init == "far" else [1.0, 0.0]))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    frames_at = sorted({int(s) for s in args.frames.split(",") if int(s) <= args.steps})
    fixed_noise = torch.randn(2000, model.noise_dim, generator=torch.Generator().manual_seed(7))
    ref = sample(2000, torch.Generator().manual_seed(8))             # drawn behind q
    frames, curve, log = [], {"step": [], "loss": [], "ed": []}, open(f"{args.out}/log.txt", "w")
    t0 = time.time()
    for step in (bar := tqdm(range(args.steps + 1), desc=f"toy {args.data}", mininterval=1)):
        if step in frames_at:
            frames.append((step, model(fixed_noise.to(device)).detach().cpu()))
        if step == args.steps:
            break
        x = model(torch.randn(args.batch, model.noise_dim, device=device))   # (N, 2) q
        y_pos = sample(args.n_pos, g_data).to(device)                # (P, 2) p
        x_sg = x.detach()
        V = drift_field(x_sg, y_pos, x_sg, tau=args.tau, kernel_norm=args.kernel_norm,
                        kernel=args.kernel, a=args.attract, b=args.repel,
                        sinkhorn_iters=args.sinkhorn_iters)
        loss = F.mse_loss(x, x_sg + V)          # Eq. (6): the target x + V carries no grad
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()} at step {step}; raise --tau, lower --lr")
        for group in opt.param_groups:                               # cosine decay to 0
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0:
            with torch.no_grad():                                    # a cheap ED for the curve
                ed = energy_distance(model(fixed_noise[:1000].to(device)), ref[:1000].to(device))
            curve["step"].append(step), curve["loss"].append(loss.item()), curve["ed"].append(ed)
            bar.set_postfix_str(f"loss {loss.item():.2e} ED {ed:.2e}")
            print(f"step {step:5d} | loss {loss.item():.3e} | energy distance (1000) {ed:.3e} "
                  f"| {time.time() - t0:.1f}s", file=log, flush=True)
    train_time = time.time() - t0

    # Quality: fresh points vs held-out data; the floor: real vs real at that size (3 pairs).
    gen = model(torch.randn(args.eval_n, model.noise_dim, device=device)).detach().cpu()
    held = sample(args.eval_n, torch.Generator().manual_seed(10_001))
    ed = energy_distance(gen, held)
    floor = sum(energy_distance(sample(args.eval_n, torch.Generator().manual_seed(20_000 + i)),
                                sample(args.eval_n, torch.Generator().manual_seed(30_000 + i)))
                for i in range(3)) / 3
    summary = dict(data=args.data, steps=args.steps, seed=args.seed, energy_distance=ed,
                   floor=floor, ratio=ed / floor, train_seconds=round(train_time, 1))
    print(json.dumps(summary), file=log), log.close()
    figures(args, gen, held, frames, curve, ed, floor)
    save_checkpoint(model, f"{args.out}/model.safetensors", kind="mlp",
                    config=dict(kind="mlp", noise_dim=model.noise_dim), args=json.dumps(vars(args)))
    print(f"trained {args.steps} steps in {train_time:.1f}s | energy distance {ed:.2e} | "
          f"real-vs-real floor {floor:.2e} | ratio {ed / floor:.2f}")
    print(f"wrote {args.out}/{{toy,toy_evolution,toy_curves}}.png, model.safetensors, log.txt")
    return summary


def figures(args, gen, held, frames, curve, ed, floor):
    """toy.png (the final points over held-out data), toy_evolution.png (the frames), and
    toy_curves.png (loss and energy distance vs step)."""
    import matplotlib.pyplot as plt

    def scatter(ax, q, title, n_show=3000):
        ax.scatter(*held[:n_show].T, s=1, c="tab:blue", alpha=0.4, label="data p")
        ax.scatter(*q[:n_show].T, s=1, c="tab:orange", alpha=0.6, label="generated q")
        lim = (-1.6, 1.6) if args.init == "default" else (-1.6, 3.6)  # "far" starts at (3, 3)
        ax.set(xlim=lim, ylim=lim, title=title, aspect="equal")
    fig, ax = plt.subplots(figsize=(5, 5))
    scatter(ax, gen, f"{args.data}: energy distance {ed:.1e} (floor {floor:.1e})")
    ax.legend(loc="upper right", markerscale=8)
    fig.tight_layout(), fig.savefig(f"{args.out}/toy.png", dpi=100), plt.close(fig)
    fig, axes = plt.subplots(1, len(frames), figsize=(2.2 * len(frames), 2.4), squeeze=False)
    for ax, (s, q) in zip(axes[0], frames):
        scatter(ax, q, f"step {s}")
        ax.tick_params(labelsize=6)
    fig.tight_layout(), fig.savefig(f"{args.out}/toy_evolution.png", dpi=100), plt.close(fig)
    save_curves(f"{args.out}/toy_curves.png", {
        "loss = mean V^2 / 2": (curve["step"], curve["loss"]),
        "energy distance (1000 points)": (curve["step"], curve["ed"])},
        title=f"toy {args.data}", ylabel="value (log scale)")


if __name__ == "__main__":
    try:
        args = parse_args()
        train(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:   # a message, not a
        sys.exit(f"toy.py: error: {e}")                                   # traceback
