"""
A faster drift loss for CPUs: field.drift_loss's numbers (tested equal to 4e-6, float32
rounding), fewer passes.

field.py is the reference, written as the official drift_loss.py; read that one. This file is
the one speed path it has, chosen in train.py by --fast-loss (the README gives the measured
step times behind its default). Same signature and semantics as field.drift_loss, a V+ - b V-
(Tab. 1) included; another kernel_norm or kernel falls back to the reference. Where the time
goes, and what is done here:
- Both softmaxes cost an exp per element (8x a multiply on our CPUs). With m_i = min_j d_ij,
  n_j = min_i d_ij and h = -log2(e) / (2 tau), row = 2^(h (d - m_i)), col = 2^(h (d - n_j)):
  softmax_j = row^2 / Zr_i, softmax_i = col^2 / Zc_j, so A = row col / sqrt(Zr_i Zc_j): two
  exp2 (faster than exp) and no divisions over the (rows, T, C_g, M) tensor. V is quadratic in
  A (S_neg A_pos - S_pos A_neg), so the 1 / sqrt(Zr_i) factor goes into the row sums.
- Exponents are clamped at 2^-50: torch's exp2 and multiplies slow down 2x on denormals, and
  anything clamped is far below the floor that replaces it.
- For a = b the coefficients' row sum is 0, so the official - sum_j R_ij x_i term is dropped
  (~1e-7); for a != b it is (a - b) S_pos S_neg, subtracted once per row.
- The final MSE is an autograd Function whose residual buffer becomes the gradient: two
  gen-sized tensors fewer than autograd keeps (gigabytes at paper scale).

Demo: python field_fast.py    # the two losses side by side on a random group
"""
import math

import torch

import field

# Shapes: as field.py. B rows; C_g generated, C_n negatives, C_p positives; M = C_g + C_n + C_p;
#         S feature dim; T temperatures; r rows of one chunk.
LOG2E = 1.0 / math.log(2.0)    # exp(l) = exp2(l * LOG2E)


def affinity(d, h, floor):
    """Eq. (17) with the official floor for all taus: d (r, C_g, M) normalized distances (self-
    mask added), h (T, 1, 1) = -LOG2E / (2 tau) -> A sqrt(Zr_i) (r, T, C_g, M), sqrt(Zr_i)
    (r, T, C_g, 1), where A = sqrt(max(softmax_j(-d / tau) softmax_i(-d / tau), floor))."""
    lo = -50.0 if floor >= 2.0 ** -96 else -126.0                   # see the docstring above
    col = torch.addcmul(d.amin(-2, keepdim=True)[:, None] * -h, d[:, None], h)  # h (d - n_j)
    col.clamp_min_(lo).exp2_()                                       # (r, T, C_g, M)
    # (square-sums, not vector_norm: torch's vector_norm is 10x slower over these dimensions)
    row = ((d - d.amin(-1, keepdim=True))[:, None] * h).clamp_min_(lo).exp2_()  # (r, T, C_g, M)
    rZc = col.square().sum(-2, keepdim=True).sqrt_()                # (r, T, 1, M) sqrt(Zc_j)
    rZr = row.square().sum(-1, keepdim=True).sqrt_()                # (r, T, C_g, 1) sqrt(Zr_i)
    A = row.mul_(col.mul_(rZc.reciprocal_()))                        # A sqrt(Zr_i)
    if floor > 0:
        A.clamp_min_(rZr * math.sqrt(floor))                         # A >= sqrt(floor)
    return A, rZr


def forces(d, y, w, n_neg, h, floor, out_scale, x=None, a=1.0, b=1.0):
    """V_tau for every tau, times out_scale: (r, T, C_g, S), one matrix product. x (r, C_g, S):
    the generated features, needed only for a != b."""
    A, rZr = affinity(d, h, floor)
    if w is not None:
        A.mul_(w[:, None, None, :])                                  # CFG weights after norm
    norm = out_scale / rZr.square()                                  # both 1 / sqrt(Zr_i)
    A_neg, A_pos = A[..., :n_neg], A[..., n_neg:]
    S_neg = A_neg.sum(-1, keepdim=True).mul_(norm)                   # (r, T, C_g, 1)
    S_pos = A_pos.sum(-1, keepdim=True).mul_(norm)
    A_neg.mul_(-b * S_pos)
    A_pos.mul_(a * S_neg)                                            # the signed coefficients
    r, T, C_g, M = A.shape
    V = torch.bmm(A.view(r, T * C_g, M), y).view(r, T, C_g, -1)     # (r, T, C_g, S)
    if a != b:                                          # - sum_m R_m x: the mean-shift form
        V.sub_((a - b) * S_pos * S_neg / norm * x[:, None])
    return V


class FixedPointLoss(torch.autograd.Function):
    """loss_b = mean_{i,s} (gen / s_in - goal)^2, the goal constant. The residual is built in
    the goal's buffer, saved, and scaled in place into the gradient 2 res / (s_in C_g S)."""

    @staticmethod
    def forward(ctx, gen, goal, s_in):
        res = goal.neg_().addcdiv_(gen, s_in)                        # (B, C_g, S), in place
        ctx.save_for_backward(res, s_in)
        return torch.linalg.vector_norm(res, dim=(-1, -2)).square() / res[0].numel()   # (B,)

    @staticmethod
    def backward(ctx, grad_loss):
        res, s_in = ctx.saved_tensors
        return res.mul_(grad_loss[:, None, None] * (2.0 / res[0].numel()) / s_in), None, None


def drift_loss(gen, pos, neg=None, w_gen=None, w_pos=None, w_neg=None,
               taus=(0.02, 0.05, 0.2), kernel_norm="both", floor=1e-6, all_reduce=None,
               chunk_rows=None, memory_budget=2 ** 31, kernel="laplace", a=1.0, b=1.0,
               sinkhorn_iters=20, stats=None, chunk_bytes=None):
    """field.drift_loss, faster: the same arguments, loss (B,) and info."""
    if kernel_norm != "both" or kernel != "laplace":
        return field.drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, taus, kernel_norm, floor,
                                all_reduce, chunk_rows, memory_budget, kernel, a, b,
                                sinkhorn_iters, stats, chunk_bytes)
    with torch.autocast(device_type=gen.device.type, enabled=False):
        B, C_g, S = gen.shape
        x, pos = gen.detach().float(), pos.float()
        neg = x[:, :0] if neg is None else neg.float()
        C_n, C_p, T = neg.shape[1], pos.shape[1], len(taus)
        M, reduce = C_g + C_n + C_p, all_reduce or (lambda t: t)
        w = None
        if any(v is not None for v in (w_gen, w_pos, w_neg)):
            ones = lambda t: torch.ones_like(t[:, :, 0])
            w = torch.cat([ones(x) if w_gen is None else w_gen.float(),
                           ones(neg) if w_neg is None else w_neg.float(),
                           ones(pos) if w_pos is None else w_pos.float()], dim=1)  # (B, M)
        chunk_bytes = chunk_bytes or (2 ** 22 if x.device.type == "cpu" else 2 ** 28)
        rows = chunk_rows or max(1, chunk_bytes // (4 * T * C_g * M))
        chunks = [slice(i, i + rows) for i in range(0, B, rows)]
        keep = 4 * B * C_g * (M + T * S) <= memory_budget
        y_of = lambda r: torch.cat([x[r], neg[r], pos[r]], dim=1)   # (r, M, S)

        def cdist(r):                                                # (r, C_g, M), clipped
            y = y_of(r)
            sq = (x[r] * x[r]).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
            return torch.baddbmm(sq, x[r], y.mT, alpha=-2).clamp_min_(1e-8).sqrt_(), y

        with torch.no_grad():
            acc, kept, given = torch.zeros(3, dtype=torch.float64, device=x.device), [], stats or {}
            for r in chunks if "scale" not in given or keep else []:  # pass 1: the scale
                d, y = cdist(r)
                wd = d.sum(1) if w is None else d.sum(1) * w[r]      # (r, M)
                wsum = d.new_full((len(d),), M) if w is None else w[r].sum(1)
                acc[:2] += torch.stack([wd.sum(1).double().sum(), C_g * wsum.double().sum()])
                kept.append((d, y) if keep else None)
            acc[2] = B * C_g * S                          # elements of V: a fill, no host copy
            kept += [None] * (len(chunks) - len(kept))
            acc = reduce(acc) if stats is None else acc
            scale = given["scale"] if "scale" in given else (acc[0] / acc[1]).float()
            s_in = (scale / math.sqrt(S)).clamp_min(1e-3)
            d_unit = scale.clamp_min(1e-3)
            h = torch.stack([-0.5 * LOG2E / (tau * d_unit) for tau in taus])[:, None, None]

            def forces_of(i, r):                                     # (r, T, C_g, S) / s_in
                d, y = kept[i] if keep else cdist(r)
                d[:, :, :C_g].diagonal(dim1=1, dim2=2).add_(100.0 * d_unit)   # self-mask
                return forces(d, y, None if w is None else w[r], C_g + C_n, h, floor, 1 / s_in,
                              x[r], a, b)

            V2 = torch.zeros(T, dtype=torch.float64, device=x.device)
            fixed = f"loss_{taus[0]}" in given                       # the step's V^2 given
            for i, r in enumerate([] if fixed else chunks):          # pass 2: per-tau RMS
                V = forces_of(i, r)
                V2 += V.square().sum((2, 3)).double().sum(0)
                kept[i] = V if keep else None
            sums = torch.cat([acc, V2])                              # this call's (parts)
            V2 = torch.stack([given[f"loss_{tau}"] for tau in taus]) if fixed else (
                (reduce(V2) if stats is None else V2) / acc[2]).float()
            info = {"scale": scale, **{f"loss_{tau}": V2[t] for t, tau in enumerate(taus)},
                    **({} if stats is None else {"sums": sums})}
            inv = V2.clamp_min(1e-8).rsqrt()
            goal = x / s_in                                          # (B, C_g, S)
            for i, r in enumerate(chunks):                           # pass 3: the goal
                V = kept[i] if not fixed and keep else forces_of(i, r)
                kept[i] = None
                for t in range(T):
                    goal[r].addcmul_(V[:, t], inv[t])
        return FixedPointLoss.apply(gen.float(), goal, s_in), info


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    gen, pos, neg = (torch.randn(64, n, 32, generator=g) for n in (16, 16, 4))
    w_neg = torch.rand(64, 4, generator=g) * 3
    ref, _ = field.drift_loss(gen, pos, neg, w_neg=w_neg)
    fast, _ = drift_loss(gen, pos, neg, w_neg=w_neg)
    print(f"max relative difference of the 64 row losses: {((fast - ref).abs() / ref).max():.1e}")
