"""
A run's progress metrics, and the Frechet distance they share with FID.

The drift loss's V^2 stays flat while the samples improve (App. A.6's normalizations keep it
near 1), so train.py --eval-every scores EMA samples against real ones held out of training:
- FD_MAE: Frechet distance of the frozen MAE's last map, averaged over its grid (256-d).
- FD_pix: Frechet distance of average-pooled pixels (MNIST: 2x2 -> 196-d): sees the blocks
  and speckles that MAE features miss.
- cls_acc: the share of samples nearest their own class's held-out mean in FD_pix's features
  (FD and FID pool the classes and miss a generator that draws one digit for every label).
`fid_from_stats` is the FID's formula (fid.py scores Inception features with it). Also here:
the log line and log.jsonl row of a log step (`write_log`), --stage mae's held-out masked L2
(`mae_heldout`), and the model FLOPs of a generator step for MFU (bench.py's GPU table).

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Sec. 5.2 (FID).
"""
import json
import os
import resource

import numpy as np
import torch

from data import split_per_class, subset, take
from encoder import mae_eval, patchify


# ------------------------------------------------------------------------------------------
# Frechet distances (FID, FD_MAE, FD_pix) and the features of the progress metrics
# ------------------------------------------------------------------------------------------
def fid_from_stats(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with tr (S1 S2)^(1/2) computed as
    tr (S1^(1/2) S2 S1^(1/2))^(1/2) (similar matrices): two symmetric eigh, no scipy sqrtm."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(w.clip(min=0))) @ V.T                                # S1^(1/2)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


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


# ------------------------------------------------------------------------------------------
# A run's metrics: the held-out reals, the numbers at --eval-every, the log, the MAE's end
# ------------------------------------------------------------------------------------------
def held_out(phi, images, labels, holdout, device):
    """`holdout` real samples per class kept out of training for the metrics -> (the real
    side of each metric {fd_mae, fd_pix: (m, D), labels: (m,)}, training images, labels)."""
    train_idx, held_idx = split_per_class(labels, holdout)
    held = take(images, held_idx, torch.Generator()).to(device)            # (m, C, H, W)
    real = dict(fd_mae=mae_pooled(phi, held), fd_pix=pixels_pooled(held),
                labels=labels[held_idx].numpy())
    return real, subset(images, train_idx), labels[train_idx]


def progress(phi, x, labels, real):
    """EMA samples x (n, C, H, W) of classes `labels` (n,) vs the held-out real ones ->
    {fd_mae, fd_pix, cls_acc}: what train.py logs at --eval-every steps."""
    pix = pixels_pooled(x)
    return dict(fd_mae=frechet(mae_pooled(phi, x), real["fd_mae"]),
                fd_pix=frechet(pix, real["fd_pix"]),
                cls_acc=class_accuracy(pix, labels.numpy(), real["fd_pix"], real["labels"]))


def write_log(out, done, avg, lr, img_s, device, evals=False):
    """A log step's averages -> one line for people (returned, and appended to out/log.txt)
    and the same numbers for programs (out/log.jsonl; with evals, the metrics' columns are
    in every row, None where not measured)."""
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    extra = " | ".join(f"{k} {v:.4g}" for k, v in avg.items() if k not in ("loss", "gnorm"))
    line = (f"step {done:07d} | loss {avg['loss']:.4f} | {extra} | gnorm {avg['gnorm']:.2f} "
            f"| lr {lr:.2e} | {img_s:.0f} img/s | {mem:.2f} GB")
    with open(os.path.join(out, "log.txt"), "a") as f:
        print(line, file=f)
    row = dict(step=done, **avg, lr=lr, img_s=round(img_s, 1), gb=round(mem, 3))
    if evals:
        for k in ("fd_mae", "fd_pix", "cls_acc"):
            row.setdefault(k, None)
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        print(json.dumps(row), file=f)
    return line


def mae_heldout(raw, ema, images, train_idx, held_idx, device):
    """--stage mae's final evaluation: masked L2 per masked location of the EMA and the raw
    weights on held-out items (fixed masks) vs the mean training image's -> (numbers, the
    held-out items)."""
    pick = lambda idx: take(images, idx, torch.Generator()).to(device)
    x_held = pick(held_idx)
    mean_image = pick(train_idx[::len(train_idx) // 5000 + 1]).mean(0)
    ema_l2, baseline = mae_eval(ema, x_held, mean_image)
    raw_l2, _ = mae_eval(raw.eval(), x_held, mean_image)
    return dict(held_out=len(held_idx), ema_masked_l2=ema_l2, raw_masked_l2=raw_l2,
                mean_image_masked_l2=baseline), x_held


# ------------------------------------------------------------------------------------------
# Speed: model FLOPs of a generator step, for MFU (bench.py's GPU table)
# ------------------------------------------------------------------------------------------
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def dit_flops(cfg):
    """Forward matmul FLOPs of DriftDiT per sample (2 per multiply-add; norms, RoPE, adds not
    counted). T = (H/p)^2 patch tokens, N = K + T tokens, H_m the SwiGLU width, L blocks:
      2 [T p^2 C_in D  (x_embed)  +  Dc D (cls_proj)  +  256 Dc + Dc^2 (alpha MLP)
         + L (6 Dc D (adaLN) + 4 N D^2 (qkv, proj) + 2 N^2 D (QK^T, AV) + 3 N D H_m (SwiGLU))
         + 2 Dc D + N D p^2 C_out  (final adaLN and linear, on all N tokens)]"""
    D, Dc, p, L = cfg.hidden_size, cfg.cond_dim, cfg.patch_size, cfg.depth
    T = (cfg.input_size // p) ** 2
    N, Hm = cfg.n_cls_tokens + T, (int(2 / 3 * int(D * cfg.mlp_ratio)) + 31) // 32 * 32
    return 2 * (T * p * p * cfg.in_channels * D + Dc * D + 256 * Dc + Dc * Dc
                + L * (6 * Dc * D + 4 * N * D * D + 2 * N * N * D + 3 * N * D * Hm)
                + 2 * Dc * D + N * D * p * p * cfg.out_channels)


def mae_flops(cfg, size):
    """Forward conv FLOPs of the MAE encoder per sample on a size x size input (before input
    patching). C = p^2 C_img channels on an h = size/p grid; stage i has width D_i = C_0 2^i on
    h_i = ceil(h_{i-1} / 2) (h_0 = h), its first block strides 2 for i > 0:
      2 [9 C C_0 h^2  (stem)  +  sum_i (9 D_in D_i h_i^2 + 9 D_i^2 h_i^2 (first block)
         + [i > 0] D_{i-1} D_i h_i^2 (1x1 projection) + (n_i - 1) 18 D_i^2 h_i^2)]"""
    h, c = size // cfg.input_patch_size, cfg.in_channels * cfg.input_patch_size ** 2
    total, d_in = 9 * c * cfg.base_channels * h * h, cfg.base_channels
    for i, n in enumerate(cfg.layers):
        d = cfg.base_channels * 2 ** i
        h = (h - 1) // 2 + 1 if i > 0 else h
        total += 9 * d_in * d * h * h + 9 * d * d * h * h + (d_in * d * h * h if i > 0 else 0)
        total += (n - 1) * 18 * d * d * h * h
        d_in = d
    return 2 * total


def step_flops(cfg, mae_cfg, n_gen, n_real):
    """Model FLOPs of one generator step: generator forward + backward (3x its forward), the
    encoder on the generated samples forward + input-gradient backward (2x: frozen weights),
    on the real ones forward only. The drift loss's matmuls are left out (timed apart)."""
    return 3 * n_gen * dit_flops(cfg) + (2 * n_gen + n_real) * mae_flops(mae_cfg, cfg.input_size)
