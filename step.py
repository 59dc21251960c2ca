"""
The generator's loss on one step (Alg. 1; official train.py::train_step's loss_fn), whole or
in micro-batches.

- `generator_loss`: x = f(noise | label, alpha) embedded by the frozen encoder WITH gradient,
  the real samples without; every feature group (B, T, D) becomes n * T drift-loss rows, one
  per (class group, token); field.drift_loss on each; the sum over groups of the row means.
- `generator_step`: a rank's class groups a few per forward/backward pass (train.py
  --micro-groups), gradients accumulated; the drift loss's two global statistics (the feature
  scale, each tau's force RMS) stay those of the whole step, so any split is the same step.

train.py runs these in its loop; memory.py runs them on the meta device to plan a GPU's memory.
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Alg. 1, App. A.5-A.7.
"""
import contextlib

import torch

import field
from encoder import ACTIVATION_KWARGS, MAEResNet, feature_groups


def features(phi, x):
    """Feature groups name -> (B, T, D) of x: the MAE's (App. A.5); for the pixel models phi
    is a function (MAE + ConvNeXt)."""
    return feature_groups(phi, x, **ACTIVATION_KWARGS) if isinstance(phi, MAEResNet) else phi(x)


def generator_loss(net, phi, labels, alpha, pos, unc, noise, style_idx=None,
                   taus=(0.2, 0.05, 0.02), all_reduce=None, drift_loss=field.drift_loss,
                   cached=None, stats=None, **field_kw):
    """The official train_step's loss_fn for n groups (as data.draw_groups gives them): x =
    f(noise | label, alpha) embedded by phi WITH gradient, the real samples without; feature
    group (B, T, D) -> n * T drift-loss rows, one per (class group, token). Returns (sum over
    groups of the mean row loss, {group: loss}, {group: drift_loss's info}, App. A.6).
    drift_loss: field.drift_loss (the reference) or field_fast.drift_loss (same numbers);
    field_kw: its ablation options (kernel, kernel_norm, a, b...; field.drift_loss only).
    cached: {name: (N, T, D)} the real samples' features, precomputed (embed_all); then pos
    and unc are item indices (n, N_pos), (n, N_unc) into it instead of images. stats: {group:
    info} of the whole step (micro-batches: generator_step), used instead of these rows'."""
    n, N_pos, N_unc = pos.shape[0], pos.shape[1], unc.shape[1]
    N_neg = noise.shape[0] // n
    # App. A.7: unconditional negatives weighted w = (alpha - 1)(N_neg - 1) / N_unc (-1: self-mask)
    w_unc = (alpha.float() - 1) * (N_neg - 1) / max(1, N_unc)                      # (n,)
    real = torch.cat([pos, unc], 1).flatten(0, 1)       # (n (N_pos+N_unc), C, H, W) or items
    with torch.no_grad():   # phi is frozen: a real sample's features are the same every step
        real = features(phi, real) if cached is None else {k: v[real] for k, v in cached.items()}
    x = net(noise, labels.repeat_interleave(N_neg), alpha.repeat_interleave(N_neg),
            style_idx=style_idx)                                # (n * N_neg, C, H, W)
    gen = features(phi, x)                                      # name -> (n * N_neg, T, D)
    # (n * m, T, D) -> (n * T, m, D): a row is one (class group, token), official '(b f) x d'
    rows = lambda f, m: f.unflatten(0, (n, m)).transpose(1, 2).flatten(0, 1)
    loss, per_group, infos = 0.0, {}, {}
    for name, f in gen.items():
        T = f.shape[1]
        y = rows(real[name], N_pos + N_unc)                     # (n * T, N_pos + N_unc, D)
        w = w_unc.repeat_interleave(T)[:, None].expand(-1, N_unc)                  # (n * T, N_unc)
        row_loss, infos[name] = drift_loss(rows(f, N_neg), y[:, :N_pos], y[:, N_pos:], w_neg=w,
                                           taus=taus, all_reduce=all_reduce, stats=None if
                                           stats is None else stats[name], **field_kw)  # (n * T,)
        per_group[name] = row_loss.mean()
        loss = loss + per_group[name]
    return loss, per_group, infos


def in_parts(fn, size):
    """fn over its inputs `size` items at a time (dim 0), the outputs (tensors, or dicts of
    them) concatenated: the no-grad statistics pass of generator_step."""
    def run(*args, **kw):
        outs = [fn(*(a[i:i + size] for a in args), **{k: v if v is None else v[i:i + size]
                                                       for k, v in kw.items()})
                for i in range(0, len(args[0]), size)]
        return ({k: torch.cat([o[k] for o in outs]) for k in outs[0]}
                if isinstance(outs[0], dict) else torch.cat(outs))
    return run


def generator_step(net, raw, phi, batch, micro, backward=True, cached=None,
                   amp=contextlib.nullcontext(), **loss_kw):
    """One step's loss (and, with backward, its gradients) on this rank's n class groups,
    `micro` groups per forward/backward pass (--micro-groups), gradients accumulated (DDP
    synchronizes on the last pass only). The drift loss's two global statistics (the feature
    scale, each tau's force RMS) stay those of the whole step: with several passes a no-grad
    pass over all of them computes them first (all-reduced there: the generator's forward
    once more), the real samples' features kept for the gradient passes. amp: the autocast
    context of the forward passes (backward runs outside it). -> (loss, {tau:
    mean V_tau^2 over feature groups}), the same step, to float32 rounding, for any micro."""
    labels, alpha, pos, unc, noise, style = batch
    n, N_neg = len(labels), len(noise) // len(labels)
    parts, stats = [slice(i, i + micro) for i in range(0, n, micro)], None
    if len(parts) > 1:
        with torch.no_grad(), amp:
            embed = in_parts(lambda x: features(phi, x), micro * N_neg)
            if cached is None:          # the reals' features, as indices into them from now on
                cached = embed(torch.cat([pos, unc], 1).flatten(0, 1))
                pos, unc = torch.arange(n * (pos.shape[1] + unc.shape[1]), device=noise.device
                                        ).view(n, -1).split([pos.shape[1], unc.shape[1]], 1)
            stats = generator_loss(in_parts(raw, micro * N_neg), embed, labels, alpha, pos, unc,
                                   noise, style, cached=cached, **loss_kw)[2]
    total = 0.0
    for i, r in enumerate(parts):
        gen_r = slice(r.start * N_neg, r.stop * N_neg)
        sync = i == len(parts) - 1 or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():
            with amp:
                loss, _, infos = generator_loss(net, phi, labels[r], alpha[r], pos[r], unc[r],
                                                noise[gen_r], style[gen_r], cached=cached,
                                                stats=stats, **loss_kw)
            loss = loss * (len(labels[r]) / n)      # each group's row mean over the whole step
            if backward:
                loss.backward()
        total = total + loss.detach()
    taus = loss_kw.get("taus", (0.2, 0.05, 0.02))
    return total, {tau: sum(info[f"loss_{tau}"] for info in infos.values()) / len(infos)
                   for tau in taus}
