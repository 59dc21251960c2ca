"""
The drifting field V and the drift loss: pure tensor functions, float32, no state.

Paper: Generative Modeling via Drifting, Deng, Li, Li, Du, He, arXiv:2602.04770 (equation
numbers refer to v2). Official code: github.com/lambertae/drifting @ accd0cf, drift_loss.py.

- `drift_field(x, y_pos, y_neg, tau)`: the kernel mean-shift field of Sec. 3 / Alg. 2, as the
  official toy notebook. `drift_loss(gen, pos, neg, ...)`: the official ImageNet loss,
  drift_loss.py line for line (App. A.6-A.7), over chunks of rows so paper-size groups fit.

The idea in one line (Eq. 6): move each generated sample x toward x + V(x), where
V = V+ - V- pulls toward data and pushes away from the other generated samples; train with
loss = ||f(eps) - stopgrad(f(eps) + V)||^2, whose value is ||V||^2.
Each function runs when pasted alone after `import math, torch`.    Demo: python field.py
"""
import math

import torch

# Shapes: B rows (one per class group x feature location); C_g generated, C_n unconditional
#   negatives, C_p positives per row; M = C_g + C_n + C_p targets; S feature dim; T temperatures.
#   drift_field: N generated, P positive, Q negative points of dim D. Names as drift_loss.py.


@torch.no_grad()
def drift_field(x, y_pos, y_neg, tau=0.05, kernel_norm="both", mask_self=None,
                kernel="laplace", a=1.0, b=1.0, sinkhorn_iters=20):
    """V_{p,q}(x) = a V+_p(x) - b V-_q(x), the kernel mean-shift field of Alg. 2.

    x (..., N, D) generated points; y_pos (..., P, D) data; y_neg (..., Q, D) negatives,
    usually x itself; mask_self drops k(x_i, x_i) (default: when `y_neg is x`). kernel:
    "laplace" k = exp(-||x - y|| / tau) (Eq. 12), or "gaussian" k = exp(-||x - y||^2 /
    (2 tau^2)): then with "per_set", V = tau^2 grad log(p_tau / q_tau) (Tweedie), p_tau
    the points of p smoothed by N(0, tau^2 I). kernel_norm: "both" = Eq. (17), the notebook's
    k / sqrt(rowsum colsum); "y" = softmax over targets only; "none" = the raw kernel
    (Tab. 11); "per_set" = V+ and V- normalized separately, as Eq. (8)-(11) are written;
    "sinkhorn" = `sinkhorn_iters` log-domain Sinkhorn steps (arXiv:2603.12366), alternately
    rows (each x) summing to 1 and columns (each target) to N / M, M = Q + P, columns last.
    a, b: the anti-symmetry ablation of Tab. 1 (FID: V+ - V- 8.46, 1.5V+ - V- 41.05,
    V+ - 1.5V- 46.28, 2V+ - V- 86.16, V+ - 2V- 112.84, V+ only (b = 0) 177.14).
    Returns V (..., N, D), in float32 or the inputs' wider dtype."""
    mask_self = y_neg is x if mask_self is None else mask_self      # decided before any cast
    dtype = torch.promote_types(x.dtype, torch.float32)             # never below float32
    x, y_pos, y_neg = x.to(dtype), y_pos.to(dtype), y_neg.to(dtype)
    N, Q, M = x.shape[-2], y_neg.shape[-2], y_neg.shape[-2] + y_pos.shape[-2]
    dist = torch.cdist(x, torch.cat([y_neg, y_pos], dim=-2))        # (.., N, Q + P)
    if mask_self:                                                   # k(x_i, x_i) -> 0
        dist[..., :Q].diagonal(dim1=-2, dim2=-1).add_(1e6)          # as the notebook
    if kernel == "laplace":
        logits = -dist / tau                                        # (.., N, Q + P)
    elif kernel == "gaussian":
        logits = -dist.square() / (2 * tau ** 2)                    # (.., N, Q + P)
    else:
        raise ValueError(f"kernel={kernel!r}: expected laplace or gaussian")
    if kernel_norm == "both":      # softmax over y times softmax over x: Alg. 2, Eq. (17)
        A = (logits.softmax(-1) * logits.softmax(-2)).sqrt()
    elif kernel_norm == "y":
        A = logits.softmax(-1)
    elif kernel_norm == "none":
        A = logits.exp()
    elif kernel_norm == "per_set":
        A = torch.cat([logits[..., :Q].softmax(-1), logits[..., Q:].softmax(-1)], dim=-1)
    elif kernel_norm == "sinkhorn":   # log domain: rows sum to 1, then columns to N / M
        for _ in range(sinkhorn_iters):
            logits = logits - logits.logsumexp(-1, keepdim=True)
            logits = logits - logits.logsumexp(-2, keepdim=True) + math.log(N / M)
        A = logits.exp()
    else:
        raise ValueError(f"kernel_norm={kernel_norm!r}: expected both, y, none, per_set or "
                         f"sinkhorn")
    A_neg, A_pos = A[..., :Q], A[..., Q:]                           # (.., N, Q), (.., N, P)
    # Alg. 2 steps 5-6: the estimator of Eq. (11), E[k+ k- (y+ - y-)] / (Z_p Z_q)
    W_pos = A_pos * A_neg.sum(-1, keepdim=True)                     # (.., N, P)
    W_neg = A_neg * A_pos.sum(-1, keepdim=True)                     # (.., N, Q)
    V = a * W_pos @ y_pos - b * W_neg @ y_neg                       # (.., N, D)
    # Rows of W_pos and W_neg have equal sums, so for a = b this is sum W (y - x), the
    # mean-shift form; for a != b the x terms no longer cancel: subtract them (as drift_loss)
    if a != b:
        V = V - (a * W_pos.sum(-1, keepdim=True) - b * W_neg.sum(-1, keepdim=True)) * x
    return V                                                        # (.., N, D)


def drift_loss(gen, pos, neg=None, w_gen=None, w_pos=None, w_neg=None,
               taus=(0.02, 0.05, 0.2), kernel_norm="both", floor=1e-6, all_reduce=None,
               chunk_rows=None, memory_budget=2 ** 31, kernel="laplace", a=1.0, b=1.0,
               sinkhorn_iters=20, stats=None, chunk_bytes=None):
    """The official drift loss (drift_loss.py; App. A.6-A.7). Returns (loss (B,), info).

    gen (B, C_g, S) generated features (with grad); pos (B, C_p, S); neg (B, C_n, S) or None:
    unconditional negatives for CFG (Sec. 3.5); w_* (B, C_*) per-target weights (default 1;
    for CFG w_neg = (alpha - 1)(C_g - 1) / C_n). taus: one normalized field per temperature,
    summed ("R_list" officially). kernel_norm, kernel, a, b, sinkhorn_iters: the ablations of
    drift_field ("both", "laplace", 1, 1 are official); gaussian uses the normalized distance.
    floor: the official lower bound on softmax_row * softmax_col ("both"; "y" floors at its
    sqrt; none for the others: on "sinkhorn" it would break the marginals); 0 disables it.
    all_reduce: optional callable that sums a tensor over ranks and returns it. `scale` and
    the per-tau force RMS are means over ALL rows, so rows split over ranks must reduce them.
    stats: a dict when these rows are part of a step (micro-batches): nothing is reduced, a
    given `scale` and `loss_{tau}` are the step's, and info["sums"] holds this call's sums
    (distance, weight, elements of V; V_tau^2) to add up over the parts. chunk_rows: rows per chunk
    (default: chunk_bytes per (rows, T, C_g, M) tensor, 4 MB on a CPU, 256 MB on a GPU).
    memory_budget: bytes that distances and forces of all rows may keep between the passes;
    above it each chunk is recomputed per pass (same loss, bounded memory, ~2x compute).
    info: `scale`, `loss_{tau}` = mean(V_tau^2) BEFORE normalization (falls as q -> p; A.6)."""
    # NOTE: the official code casts to float32 too; softmax over distances breaks in bf16.
    with torch.autocast(device_type=gen.device.type, enabled=False):    # 1. Defaults & casting
        B, C_g, S = gen.shape
        neg = gen[:, :0] if neg is None else neg
        C_n, C_p, T = neg.shape[1], pos.shape[1], len(taus)
        ones = lambda t: torch.ones_like(t[:, :, 0], dtype=torch.float32)
        targets_w = torch.cat([ones(gen) if w_gen is None else w_gen.float(),
                               ones(neg) if w_neg is None else w_neg.float(),
                               ones(pos) if w_pos is None else w_pos.float()], dim=1)  # (B, M)
        gen, pos, neg = gen.float(), pos.float(), neg.float()
        old_gen = gen.detach()                                      # stop-gradient
        M, reduce = C_g + C_n + C_p, all_reduce or (lambda t: t)
        rows = chunk_rows or max(1, (chunk_bytes or (2 ** 22 if gen.device.type == "cpu" else
                                                     2 ** 28)) // (4 * T * C_g * M))
        chunks = [slice(i, i + rows) for i in range(0, B, rows)]
        keep = 4 * B * C_g * (M + T * S) <= memory_budget          # distances + forces

        def cdist(x, y, eps=1e-8):                                  # (r, C_g, M), official
            sq_dist = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.mT
            return sq_dist.clamp_min(eps).sqrt()
        targets = lambda r: torch.cat([old_gen[r], neg[r], pos[r]], dim=1)  # (r, M, S)

        with torch.no_grad():
            # 2. Feature normalization (Eq. 18-22): one scale per call over ALL rows, so the
            # mean weighted distance is 1 and coordinates have mean distance sqrt(S). Sums
            # are taken per row and added in float64: chunks and ranks do not change them.
            dist, acc = [None] * len(chunks), torch.zeros(3, dtype=torch.float64,
                                                          device=gen.device)
            given = stats or {}
            for i, r in enumerate(chunks if "scale" not in given or keep else []):
                d = cdist(old_gen[r], targets(r))                   # (r, C_g, M)
                w = targets_w[r]                                    # (r, M)
                acc[:2] += torch.stack([(d * w[:, None, :]).sum((1, 2)).double().sum(),
                                        C_g * w.sum(1).double().sum()])
                dist[i] = d if keep else None
            acc[2] = B * C_g * S                   # elements of V (a fill, no host copy)
            acc = reduce(acc) if stats is None else acc  # sums over ranks; scale = weighted
            scale = given["scale"] if "scale" in given else (acc[0] / acc[1]).float()  # mean
            scale_inputs = (scale / math.sqrt(S)).clamp_min(1e-3)   # coordinates ~ 1

            def forces(i, r):                  # the official force loop, all taus at once
                y = targets(r)                                      # (r, M, S)
                d = dist[i] if keep else cdist(old_gen[r], y)       # (r, C_g, M)
                dist_normed = d / scale.clamp_min(1e-3)
                dist_normed[:, :, :C_g].diagonal(dim1=1, dim2=2).add_(100.0)    # self-mask
                if kernel == "laplace":                             # (r, T, C_g, M)
                    logits = torch.stack([-dist_normed / R for R in taus], dim=1)
                elif kernel == "gaussian":
                    logits = torch.stack([-dist_normed.square() / (2 * R ** 2) for R in taus], 1)
                else:
                    raise ValueError(f"kernel={kernel!r}: expected laplace or gaussian")
                if kernel_norm == "both":
                    affinity = logits.softmax(-1) * logits.softmax(-2)
                    affinity = affinity.clamp_min(floor).sqrt()     # Eq. (17) + the floor
                elif kernel_norm == "y":
                    affinity = logits.softmax(-1).clamp_min(math.sqrt(floor))
                elif kernel_norm == "none":
                    affinity = logits.exp()
                elif kernel_norm == "per_set":
                    affinity = torch.cat([logits[..., :C_g + C_n].softmax(-1),
                                          logits[..., C_g + C_n:].softmax(-1)], dim=-1)
                elif kernel_norm == "sinkhorn":  # as drift_field: rows to 1, columns to C_g / M
                    for _ in range(sinkhorn_iters):
                        logits = logits - logits.logsumexp(-1, keepdim=True)
                        logits = logits - logits.logsumexp(-2, keepdim=True) + math.log(C_g / M)
                    affinity = logits.exp()
                else:
                    raise ValueError(f"kernel_norm={kernel_norm!r}: expected both, y, none, "
                                     f"per_set or sinkhorn")
                affinity = affinity * targets_w[r][:, None, None, :]  # CFG weights after norm
                aff_neg, aff_pos = affinity[..., :C_g + C_n], affinity[..., C_g + C_n:]
                R_coeff = torch.cat([-aff_neg * (b * aff_pos.sum(-1, keepdim=True)),
                                     aff_pos * (a * aff_neg.sum(-1, keepdim=True))], dim=-1)
                targets_scaled = y / scale_inputs                   # (r, M, S)
                V = torch.einsum("rtim,rms->rtis", R_coeff, targets_scaled)  # (r, T, C_g, S)
                # V = sum_m R_m (y_m - x). For a = b the coefficients sum to 0 (up to rounding)
                # and the official code keeps the term; for a != b it makes a V+ - b V- the
                # mean-shift form (y - x)
                return V - R_coeff.sum(-1, keepdim=True) * (old_gen[r] / scale_inputs)[:, None]

            # 3. Drift normalization (Eq. 23-25): the RMS of each tau's field over ALL rows.
            V2, kept = torch.zeros(T, dtype=torch.float64, device=gen.device), [None] * len(chunks)
            fixed = f"loss_{taus[0]}" in given
            for i, r in enumerate([] if fixed else chunks):
                V = forces(i, r)                                    # (r, T, C_g, S)
                V2 += V.square().sum((2, 3)).double().sum(0)        # (T,)
                kept[i], dist[i] = (V if keep else None), None
            sums = torch.cat([acc, V2])                             # this call's, for parts
            V2 = torch.stack([given[f"loss_{tau}"] for tau in taus]) if fixed else (
                (reduce(V2) if stats is None else V2) / acc[2]).float()  # (T,)
            force_scale = V2.clamp_min(1e-8).sqrt()[:, None, None]  # (T, 1, 1) mean(V^2)
            info = {"scale": scale, **{f"loss_{tau}": V2[t] for t, tau in enumerate(taus)},
                    **({} if stats is None else {"sums": sums})}

        # 4. Loss, chunk by chunk (Eq. 6): MSE to the stop-gradient goal x + sum_tau V / lambda
        loss = []
        for i, (r, x) in enumerate(zip(chunks, gen.split(rows))):   # split: one backward node
            with torch.no_grad():
                V = kept[i] if kept[i] is not None else forces(i, r)  # (r, T, C_g, S)
                kept[i] = None
                goal_scaled = old_gen[r] / scale_inputs + (V / force_scale).sum(1)
            loss.append(((x / scale_inputs - goal_scaled) ** 2).mean((-1, -2)))  # (r,)
    return torch.cat(loss), info                                    # (B,)


if __name__ == "__main__":
    torch.manual_seed(0)
    y, x = torch.randn(2, 512, 2) * 0.3 + torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])  # p, q
    V = drift_field(x, y, x, tau=0.2)
    print(f"drift_field: mean V = {V.mean(0).tolist()} (points right, toward p)")
    print(f"p = q: |V| = {drift_field(y, y, y.clone(), mask_self=False).abs().max():.2e}")
    gen = torch.randn(4, 16, 8, requires_grad=True)
    loss, info = drift_loss(gen, torch.randn(4, 16, 8) + 1.0)
    loss.sum().backward()
    print("drift_loss:", loss.detach().numpy().round(3), {k: f"{v:.3g}" for k, v in info.items()})
