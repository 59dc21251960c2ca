"""
The paper's ablation tables, rerun small: each row a training run with the row's flags, scored
and put in a markdown table with the paper's ImageNet FID beside it. The only file that
launches training runs (toy.train in this process; train.py as a process per MNIST row).

- toy:   the 2-D toy (toy.py), rows x seeds, scored by energy distance / real-vs-real floor.
- mnist: the S4 MNIST recipe (train.py, reference loss, V+ - V- unless the row says otherwise),
         scored by the FID protocol of fid.py (per_class EMA samples of each class, alpha 1).
A finished row is read, not rerun; a killed MNIST row resumes from its checkpoint; a row that
fails (a diverged ablation) is a "failed" line, the other rows still run.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Tab. 1, Tab. 2, Tab. 11.
    python ablate.py toy --ablation antisymmetry --out runs/toy_tab1              # 3 seeds a row
    python ablate.py toy --ablation kernel --out runs/toy_tab11 -- --steps 1000   # toy.py flags
    python ablate.py mnist --ablation antisymmetry --weights W.pth --ref b.npz --out runs/t1 \\
        -- --mae-ckpt runs/mae_mnist_pixel --steps 800                           # train.py flags
"""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
from einops import rearrange

import fid
import toy
from checkpoint import read_checkpoint, read_metadata, write_atomic
from models import MLP
from sample import decode, generate, load_checkpoint

# ------------------------------------------------------------------------------------------
# The rows: name -> (flags, the paper's ImageNet FID beside it)
# ------------------------------------------------------------------------------------------
ABLATIONS = {
    # Tab. 1, anti-symmetry: V = a V+ - b V- (B/2, FID 8.46 only when a = b)
    "antisymmetry": {"V+ - V-": ({}, 8.46), "1.5V+ - V-": (dict(attract=1.5), 41.05),
                     "V+ - 1.5V-": (dict(repel=1.5), 46.28), "2V+ - V-": (dict(attract=2.0), 86.16),
                     "V+ - 2V-": (dict(repel=2.0), 112.84), "V+ only": (dict(repel=0.0), 177.14)},
    # Tab. 2, allocation: N_pos data points against the --batch generated ones (paper: 64)
    "n_pos": {f"N_pos {n}": (dict(n_pos=n), fid) for n, fid in
              ((1, 20.43), (16, 10.39), (32, 8.97), (64, 8.46))},
    # Tab. 11, kernel normalization, and two proposals after the paper (no paper FID)
    "kernel": {"x and y (both)": ({}, 8.46), "y only": (dict(kernel_norm="y"), 8.92),
               "none": (dict(kernel_norm="none"), 10.54),
               "sinkhorn": (dict(kernel_norm="sinkhorn"), None),
               "gaussian kernel": (dict(kernel="gaussian"), None)},
}


def slug(name):
    """A row name -> its folder: "x and y (both)" -> "x_and_y_both", "V+ - V-" -> "V+_-_V-"."""
    return re.sub(r"[^\w.+-]+", "_", name).strip("_")


def write_table(out, head, lines):
    with open(os.path.join(out, "table.md"), "w") as f:
        print(head, *lines, sep="\n", file=f)


# ------------------------------------------------------------------------------------------
# The toy rows (toy.train in this process)
# ------------------------------------------------------------------------------------------
def toy_table(name, out, seeds, base):
    """Every row of ABLATIONS[name] x seeds, each toy.train(base + the row's flags) into
    out/<row>/seed<k> (a finished run, one with its model.safetensors, is read from its
    log.txt, not rerun) -> the markdown lines (also table.md) and ablation.png, one scatter
    per row (the first seed)."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")
    rows, lines = ABLATIONS[name], []
    head = (f"| {name} | energy distance / floor, mean of {len(seeds)} seeds | "
            f"seeds | paper FID (ImageNet B/2) |\n|---|---|---|---|")
    print(head)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9), squeeze=False)
    for ax, (row, (flags, paper)) in zip(axes[0], rows.items()):
        ratios = []
        for seed in seeds:
            run = os.path.join(out, slug(row), f"seed{seed}")
            done = os.path.exists(f"{run}/model.safetensors")      # written last, atomically
            ratios.append(json.loads(open(f"{run}/log.txt").read().splitlines()[-1])["ratio"]
                          if done else toy.train(argparse.Namespace(**{
                              **vars(base), **flags, "seed": seed, "out": run}))["ratio"])
        lines.append(f"| {row} | {sum(ratios) / len(ratios):.2f} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} | {paper if paper else '-'} |")
        print(lines[-1], flush=True)
        model = MLP()
        model.load_state_dict(read_checkpoint(os.path.join(out, slug(row), f"seed{seeds[0]}"),
                                              "mlp")[1])                 # drawn over the data
        with torch.no_grad():
            q = model(torch.randn(3000, model.noise_dim,
                                  generator=torch.Generator().manual_seed(7)))
        p = toy.TOY_DATA[base.data](3000, torch.Generator().manual_seed(10_001))
        ax.scatter(*p.T, s=1, c="tab:blue", alpha=0.4)
        ax.scatter(*q.T, s=1, c="tab:orange", alpha=0.6)
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal", title=row)
        ax.tick_params(labelsize=6)
    fig.tight_layout(), fig.savefig(f"{out}/ablation.png", dpi=100), plt.close(fig)
    write_table(out, head, lines)
    print(f"wrote {out}/table.md, {out}/ablation.png")
    return lines


# ------------------------------------------------------------------------------------------
# The MNIST rows (python train.py per row, then the FID of its EMA weights)
# ------------------------------------------------------------------------------------------
def train_row(run, flags, train_args):
    """`python train.py` for one row into `run` with the S4 recipe, the reference loss, a = b
    = 1 (the recipe's a is 1.5) unless train_args or the row say otherwise; a row with a
    checkpoint short of its steps resumes. -> the command if it failed, else None."""
    argv = ["--model", "S4", "--out", run, "--no-fast-loss", "--attract", "1", "--repel", "1",
            *train_args] + [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}",
                                                                    str(v))]
    ckpt = os.path.join(run, "model.safetensors")
    meta = read_metadata(ckpt)[1] if os.path.exists(ckpt) else None
    if meta is not None and int(meta["step"]) >= meta["args"]["steps"]:
        return None                                             # trained, not yet scored
    argv.append("--overwrite" if meta is None else "--resume")  # no checkpoint: nothing kept
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    if subprocess.run([sys.executable, train_py, *argv]).returncode:
        return f"python train.py {' '.join(argv)}"
    return None


def mnist_table(name, out, train_args, net, mu_r, sigma_r, per_class, batch, device,
                rows=None):
    """Each row of ABLATIONS[name] (or those named in rows) trained by train_row into
    out/<row>, then the FID of its EMA weights -> (markdown lines, failed rows' commands),
    and out/ablation.png (a panel of samples per row). A row with fid.json is read, not
    redone."""
    lines, panels, failed = [], [], []
    for row, (flags, paper) in ABLATIONS[name].items():
        if rows and row not in rows:
            continue
        line = lambda value: f"| {row} | {value} | {paper if paper else '-'} |"
        run, done = os.path.join(out, slug(row)), os.path.join(out, slug(row), "fid.json")
        if not os.path.exists(done):
            bad = train_row(run, flags, train_args)
            if bad:
                failed.append(f"{row!r}: {bad}")
                lines.append(line("failed (train.py's message above)"))
                print(lines[-1], flush=True)
                continue
            score = fid.model_fid(load_checkpoint(run, device), net, mu_r, sigma_r, per_class,
                                  1.0, batch, device, run)
            def write(tmp):
                with open(tmp, "w") as f:
                    json.dump(dict(fid=score, flags=flags), f)
            write_atomic(done, write)                           # renamed over: whole or absent
        score = json.load(open(done))["fid"]
        lines.append(line(f"{score:.2f}"))
        print(lines[-1], flush=True)
        panels.append((row, score, row_samples(load_checkpoint(run, device), device)))
    if panels:
        ablation_figure(os.path.join(out, "ablation.png"), panels)
    return lines, failed


def row_samples(model, device, per_class=4):
    """The first per_class EMA samples of each class as the FID draws them (sample i: label
    i % K, seed (0, i)), alpha 1 -> one uint8 grid (K H, per_class W), a row per class."""
    K = model.cfg.num_classes
    index = [k + K * j for k in range(K) for j in range(per_class)]          # class-major
    x = decode(generate(model, index, torch.tensor(index) % K, 1.0, 0, device)).numpy()
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)  # a white frame
    return rearrange(x, "(k j) h w c -> (k h) (j w) c", k=K)


def ablation_figure(path, panels):
    """[(row, FID, grid)] -> one PNG, a panel per row titled with its FID."""
    import matplotlib
    matplotlib.use("Agg")                                            # files only, no window
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 * len(panels), 4.2), squeeze=False)
    for ax, (row, score, grid) in zip(axes[0], panels):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{row}\nFID {score:.1f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", help="a table on the 2-D toy (toy.py), rows x seeds")
    m = sub.add_parser("mnist", help="a table on MNIST: train each row (S4 recipe) and its "
                       "FID -> markdown table; finished rows are kept and skipped")
    for q in t, m:
        q.add_argument("--ablation", required=True, choices=list(ABLATIONS),
                       help="the table: antisymmetry (Tab. 1), n_pos (Tab. 2), kernel "
                       "(Tab. 11 + after)")
        q.add_argument("--out", required=True, help="folder of the row runs and table.md")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="runs per row")
    t.add_argument("toy_args", nargs=argparse.REMAINDER, help="after --: toy.py flags for "
                   "every row (e.g. -- --steps 1000 --data swiss_roll)")
    m.add_argument("--weights", required=True, help="pt_inception-2015-12-05-*.pth (fid.py)")
    m.add_argument("--ref", required=True, help="reference stats .npz (mu, sigma)")
    m.add_argument("--per-class", type=int, default=250, help="samples per class")
    m.add_argument("--batch", type=int, default=100, help="images per Inception forward")
    m.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows, by name "
                   "(e.g. \"V+ - V-\" \"V+ only\"); default: all of the table's")
    m.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: train.py flags "
                   "for every row (e.g. -- --mae-ckpt runs/mae_mnist --steps 800)")
    args = p.parse_args(argv)
    if args.cmd == "toy":
        args.base = toy.parse_args([a for a in args.toy_args if a != "--"] + ["--overwrite"])
        return args
    if args.per_class < 1 or args.batch < 1:
        p.error(f"--per-class {args.per_class} and --batch {args.batch} must be >= 1")
    unknown = set(args.rows or []) - set(ABLATIONS[args.ablation])
    if unknown:
        p.error(f"--rows {sorted(unknown)}: not rows of --ablation {args.ablation}, which are "
                f"{list(ABLATIONS[args.ablation])}")
    args.train_args = [a for a in args.train_args if a != "--"]
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.cmd == "toy":
        return toy_table(args.ablation, args.out, args.seeds, args.base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mu_r, sigma_r = fid.load_stats(args.ref)        # checked before any row trains
    head = "| row | FID (MNIST, S4 recipe) | paper FID (ImageNet B/2) |\n|---|---|---|"
    print(head, flush=True)
    with torch.no_grad():           # scoring only: each row trains in its own process
        net = fid.load_inception(args.weights, device)
        lines, failed = mnist_table(args.ablation, args.out, args.train_args, net, mu_r,
                                    sigma_r, args.per_class, args.batch, device, args.rows)
    write_table(args.out, head, lines)
    print(f"wrote {args.out}/table.md")
    if failed:                  # after the table: the finished rows are written and kept
        sys.exit(f"ablate.py: error: {len(failed)} row(s) failed, the others are in "
                 f"table.md: {'; '.join(failed)}. Rerun `ablate.py mnist` to retry them "
                 f"(a killed row resumes from its checkpoint)")
    return lines


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError, FloatingPointError) as e:   # a message, not a
        sys.exit(f"ablate.py: error: {e}")                                # traceback
