"""
The generator's loss on one step (Alg. 1; official train.py::train_step's loss_fn), whole or
in micro-batches.

- `generator_loss`: x = f(noise | label, alpha) embedded by the frozen encoder WITH gradient,
  the real samples without; every feature group (B, T, D) becomes n * T drift-loss rows, one
  per (class group, token); field.drift_loss on each; the sum over groups of the row means.
- `generator_step`: a rank's class groups a few per forward/backward pass (train.py
  --micro-groups), gradients accumulated; the drift loss's two global statistics (the feature
  scale, each tau's force RMS) stay those of the whole step, so any split is the same step.
- `mae_step`: the MAE stage's step (App. A.3), a few samples per pass (--micro-batch).

train.py runs these in its loop; memory.py runs them on the meta device to plan a GPU's memory.
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Alg. 1, App. A.3, A.5-A.7.
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
    what is known of the step's statistics} when these groups are part of a step (micro-
    batches: generator_step; field.drift_loss's `stats`)."""
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
                                           stats is None else stats.get(name, {}), **field_kw)
        per_group[name] = row_loss.mean()
        loss = loss + per_group[name]
    return loss, per_group, infos


def generator_step(net, raw, phi, batch, micro, backward=True, cached=None,
                   amp=contextlib.nullcontext(), all_reduce=None, exact=True, **loss_kw):
    """One step's loss (and, with backward, its gradients) on this rank's n class groups,
    `micro` groups per forward/backward pass (--micro-groups), gradients accumulated (DDP
    synchronizes on the last pass only). The drift loss's two global statistics (each
    feature group's scale and per-tau force RMS) stay those of the whole step: with several
    passes, two no-grad sweeps over the parts compute them first, the distance sums giving
    the scales, then, given those, the V^2 sums the force RMS; each sweep's sums of every
    group in ONE all_reduce. Exactness costs two more forwards of the generator and the
    encoder (docs/memory.md); the memory stays one part's. amp: the autocast context of the
    forwards (backward runs outside it). exact=False (--micro-stats pass): each pass uses
    its own statistics (over the ranks), no sweeps: cheaper, another loss. -> (loss, {tau:
    mean V_tau^2 over feature groups}), the same step, to float32 rounding, for any micro."""
    labels, alpha, pos, unc, noise, style = batch
    n, N_neg, taus = len(labels), len(noise) // len(labels), loss_kw.get("taus", (0.2, 0.05, 0.02))
    parts, stats = [slice(i, i + micro) for i in range(0, n, micro)], None
    part = lambda r: (labels[r], alpha[r], pos[r], unc[r], noise[r.start * N_neg:r.stop * N_neg],
                      style[r.start * N_neg:r.stop * N_neg])
    if len(parts) > 1 and exact:
        stats = {}                  # {feature group: what is known of the step's statistics}
        with torch.no_grad(), amp:
            for sweep in ("scale", "force RMS"):
                sums = {}
                for r in parts:
                    infos = generator_loss(raw, phi, *part(r), cached=cached, stats=stats,
                                           **loss_kw)[2]
                    for name, info in infos.items():
                        sums[name] = sums.get(name, 0) + info["sums"]
                total = torch.stack(list(sums.values()))            # (groups, 3 + T) float64
                total = all_reduce(total) if all_reduce else total  # over the ranks, at once
                for name, s in zip(sums, total):    # s: distance, weight, elements, V^2 sums
                    stats[name] = {"scale": (s[0] / s[1]).float()} if sweep == "scale" else {
                        **stats[name], **{f"loss_{tau}": (s[3 + t] / s[2]).float()
                                          for t, tau in enumerate(taus)}}
    loss_sum = 0.0
    for i, r in enumerate(parts):
        sync = i == len(parts) - 1 or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():
            with amp:
                loss, _, infos = generator_loss(net, phi, *part(r), cached=cached, stats=stats,
                                                all_reduce=all_reduce, **loss_kw)
            loss = loss * (len(labels[r]) / n)      # each group's row mean over the whole step
            if backward:
                loss.backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum, {tau: sum(info[f"loss_{tau}"] / len(infos) for info in infos.values())
                      for tau in taus}


def mae_step(net, x, labels, lam, micro=None, backward=True, amp=contextlib.nullcontext()):
    """One --stage mae step on this rank's batch: lam * CE + (1 - lam) * masked L2, averaged
    over the samples (MAEResNet.mae_loss), `micro` samples per forward/backward pass
    (--micro-batch; default all), gradients accumulated; DDP or FSDP synchronize on the last
    pass only. The loss is a mean of per-sample terms, so the parts weighted by their size
    are the same step (the masks are drawn part by part from the same stream: on a CPU the
    same numbers; on a GPU other draws of the same law). -> (loss, {name: batch mean})."""
    B = len(x)
    parts = [slice(i, i + (micro or B)) for i in range(0, B, micro or B)]
    loss_sum, info_sum = 0.0, {}
    for i, r in enumerate(parts):
        last = i == len(parts) - 1
        if hasattr(net, "set_requires_gradient_sync"):          # FSDP2
            net.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with amp:
                loss, info = net(x[r], labels[r], lam)          # forward = mae_loss
            share = len(x[r]) / B                               # the part's share of the mean
            if backward:
                (loss * share).backward()
        loss_sum = loss_sum + loss.detach() * share
        info_sum = {k: info_sum.get(k, 0) + v * share for k, v in info.items()}
    return loss_sum, info_sum
