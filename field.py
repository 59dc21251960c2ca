"""
The drifting field V and the drift loss: pure tensor functions, float32, no state.

Paper: Generative Modeling via Drifting, Deng, Li, Li, Du, He, arXiv:2602.04770 (equation
numbers refer to v2). Official code: github.com/lambertae/drifting @ accd0cf, drift_loss.py.

Two entry points:
- `drift_field(x, y_pos, y_neg, tau)`: the simple kernel mean-shift field of Sec. 3 / Alg. 2,
  as in the official toy notebook. For teaching and the 2-D toy run.
- `drift_loss(gen, pos, neg, ...)`: the loss the official ImageNet code trains with: feature
  and drift normalization (App. A.6), several temperatures, CFG weights. Golden-tested.

The idea in one line (Eq. 6): move each generated sample x toward x + V(x), where
V = V+ - V- pulls toward data and pushes away from the other generated samples; train with
loss = ||f(eps) - stopgrad(f(eps) + V)||^2, whose value is ||V||^2.

Demo: python field.py
"""
import math

import torch

# Shapes: B rows (one per class group x feature location); C_g generated, C_n unconditional
#         negatives, C_p positives per row; M = C_g + C_n + C_p targets; S feature dim.
#         drift_field alone: N generated, P positive, Q negative points of dim D.
# Names follow the official drift_loss.py so the two can be read side by side.

KERNEL_NORMS = ("both", "y", "none", "per_set")
CHUNK_BYTES = 2 ** 23          # float32 working set of a chunk of rows: affinities, targets, forces
LOG2E = 1.0 / math.log(2.0)    # exp(l) = exp2(l * LOG2E)
MEMORY_BUDGET = 2 ** 31        # bytes drift_loss may keep across its passes before recomputing


# ------------------------------------------------------------------------------------------
# Kernel affinities
# ------------------------------------------------------------------------------------------
def _log_affinity(logits, n_pos, kernel_norm):
    """log A from kernel logits l = -dist/tau, (..., N, M), with the last n_pos columns
    positive.

    "both"    (default): A = sqrt(softmax_j(l) * softmax_i(l)) = k_ij / sqrt(R_i C_j)  (Eq. 17)
    "y"       : softmax over targets only (Tab. 11 "softmax over y")
    "none"    : the raw kernel k = exp(l)                       (Tab. 11 "no normalization")
    "per_set" : V+ and V- each normalized by their own Z_p, Z_q, as Eq. (8)-(11) are written.
    Done in log space: with d/tau in the thousands every exp(l) underflows to 0 and a raw-kernel
    normalization would return 0/0; the log-softmax does not.
    """
    # (log_softmax is one fused kernel; logsumexp is several passes over the tensor)
    if kernel_norm == "both":
        return torch.log_softmax(logits, -1).add_(torch.log_softmax(logits, -2)).mul_(0.5)
    if kernel_norm == "y":
        return torch.log_softmax(logits, -1)
    if kernel_norm == "none":
        return logits
    if kernel_norm == "per_set":
        n = logits.shape[-1] - n_pos
        neg, pos = logits.split([n, n_pos], dim=-1)
        return torch.cat([torch.log_softmax(neg, -1), torch.log_softmax(pos, -1)], dim=-1)
    raise ValueError(f"kernel_norm={kernel_norm!r}: expected one of {KERNEL_NORMS}")


def _mean_shift(A, y, n_pos):
    """Alg. 2 step 5-6: affinities A (..., N, M) and targets y (..., M, D) -> V (..., N, D).

    W_pos = A_pos * rowsum(A_neg), W_neg = A_neg * rowsum(A_pos), V = W_pos y_pos - W_neg y_neg:
    the estimator of Eq. (11), E[k(x,y+) k(x,y-) (y+ - y-)] / (Z_p Z_q). The row sums factor
    out of the products, so no (N, M) weight matrix is formed. The weights of the two sets
    have equal totals (S_neg * S_pos), so V is a difference of two means: no x term needed.
    """
    A_neg, A_pos = A[..., :-n_pos], A[..., -n_pos:]                  # (.., N, M-P), (.., N, P)
    S_neg = A_neg.sum(-1, keepdim=True)                              # (.., N, 1)
    S_pos = A_pos.sum(-1, keepdim=True)                              # (.., N, 1)
    return S_neg * (A_pos @ y[..., -n_pos:, :]) - S_pos * (A_neg @ y[..., :-n_pos, :])


# ------------------------------------------------------------------------------------------
# The simple field (Sec. 3.2-3.3, Alg. 2; official toy notebook)
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def drift_field(x, y_pos, y_neg, tau=0.05, kernel_norm="both", mask_self=None):
    """V_{p,q}(x) = V+_p(x) - V-_q(x) with the Laplace kernel k = exp(-||x - y|| / tau) (Eq. 12).

    x (..., N, D) generated points; y_pos (..., P, D) data; y_neg (..., Q, D) negatives,
    usually x itself. mask_self: drop k(x_i, x_i) (default: when `y_neg is x`). Returns V
    (..., N, D). The toy notebook's compute_drift is this with kernel_norm="both", y_neg = x.
    """
    x, y_pos, y_neg = x.float(), y_pos.float(), y_neg.float()
    if mask_self is None:
        mask_self = y_neg is x
    P = y_pos.shape[-2]
    y = torch.cat([y_neg, y_pos], dim=-2)                            # (.., M, D), M = Q + P
    dist = torch.cdist(x, y)                                         # (.., N, M)
    if mask_self:                                                    # k(x_i, x_i) -> 0
        dist[..., :, :x.shape[-2]].diagonal(dim1=-2, dim2=-1).fill_(1e6)  # the notebook's
    A = _log_affinity(dist.mul_(-1.0 / tau), P, kernel_norm).exp_() # (.., N, M)
    return _mean_shift(A, y, P)                                      # (.., N, D)  Eq. (11)


# ------------------------------------------------------------------------------------------
# The official drift loss (App. A.6, A.7; drift_loss.py)
# ------------------------------------------------------------------------------------------
def _cdist(x, y, eps=1e-8):
    """Euclidean distances via the dot-product expansion, clipped at sqrt(eps) as official."""
    norms = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]       # |x|^2 + |y|^2
    sq = torch.baddbmm(norms, x, y.mT, alpha=-2)                            # - 2 x.y
    return sq.clamp_min_(eps).sqrt_()                                        # (B, C_g, M)


def drift_loss(gen, pos, neg=None, w_gen=None, w_pos=None, w_neg=None,
               taus=(0.02, 0.05, 0.2), kernel_norm="both", floor=1e-6, all_reduce=None,
               chunk_rows=None, memory_budget=MEMORY_BUDGET):
    """The official drift loss. Returns (loss (B,), info).

    gen (B, C_g, S) generated features (with grad); pos (B, C_p, S); neg (B, C_n, S) or None
    (unconditional negatives for CFG, Sec. 3.5); w_* (B, C_*) per-target kernel weights
    (default 1; for CFG w_neg = (alpha - 1)(C_g - 1) / C_n, App. A.7).
    taus: temperatures; one normalized field per tau, summed (App. A.6, "R_list" officially).
    kernel_norm: see `_log_affinity` ("both" is official). floor: the official lower bound
    on softmax_row * softmax_col (every affinity >= sqrt(floor)); 0 disables it.
    all_reduce: optional callable summing a tensor over ranks (e.g. dist.all_reduce wrapped to
    return its input). `scale` and the per-tau force RMS are means over ALL rows of the group,
    so a group split over ranks must reduce them to equal the single-process loss.
    chunk_rows: rows per chunk of the (rows, T, C_g, M) work (default: sized for the cache).
    memory_budget: bytes the loss may keep between its passes (distances and forces of all
    rows); above it nothing is kept and each chunk is recomputed per pass: same loss, bounded
    memory, about twice the compute.

    info: `scale` (mean weighted distance) and `loss_{tau}`: mean(V_tau^2) BEFORE force
    normalization. That number shrinks as q -> p; the loss itself stays ~constant (App. A.6).
    """
    # NOTE: the official code casts to float32 too; softmax over distances breaks in bf16.
    with torch.autocast(device_type=gen.device.type, enabled=False):
        gen, pos = gen.float(), pos.float()
        B, C_g, S = gen.shape
        neg = gen.new_zeros(B, 0, S) if neg is None else neg.float()
        if all(w is None for w in (w_gen, w_pos, w_neg)):
            w = None                                                 # all ones: skip the mul
        else:
            ones = lambda t: t.new_ones(t.shape[:2])
            w = torch.cat([ones(gen) if w_gen is None else w_gen.float(),
                           ones(neg) if w_neg is None else w_neg.float(),
                           ones(pos) if w_pos is None else w_pos.float()], dim=1)  # (B, M)
        with torch.no_grad():
            goal, s_in, info = _goal(gen.detach(), pos, neg, w, taus, kernel_norm, floor,
                                     all_reduce or (lambda t: t), chunk_rows, memory_budget)
        loss = _FixedPointLoss.apply(gen, goal, s_in)                # (B,)
    return loss, info


class _FixedPointLoss(torch.autograd.Function):
    """Eq. (6) in normalized coordinates: loss_b = mean_{i,s} (gen / s_in - goal)^2, with the
    goal a constant (stop-gradient), so d loss_b / d gen = 2 (gen / s_in - goal) / (s_in C_g S).
    Same numbers as `((gen / s_in - goal) ** 2).mean((-1, -2))`; written out so the residual
    is built in the goal's buffer and becomes the gradient: autograd would hold two more
    gen-sized tensors, and at paper scale one of those is gigabytes."""

    @staticmethod
    def forward(ctx, gen, goal, s_in):
        res = goal.neg_().addcdiv_(gen, s_in)                        # (B, C_g, S), in place
        ctx.save_for_backward(res, s_in)
        C_g, S = res.shape[-2:]
        # (vector_norm reduces without materializing res^2, another gen-sized tensor)
        return torch.linalg.vector_norm(res, dim=(-1, -2)).square() / (C_g * S)   # (B,)

    @staticmethod
    def backward(ctx, grad_loss):                                    # grad_loss (B,)
        res, s_in = ctx.saved_tensors
        B, C_g, S = res.shape
        scale = grad_loss[:, None, None] * (2.0 / (C_g * S)) / s_in  # (B, 1, 1)
        return res.mul_(scale), None, None                           # the buffer, once more


def _forces(d, y, w, C_p, inv_tau, kernel_norm, floor, out_scale, bufs=None):
    """Distances d (r, C_g, M), targets y (r, M, S), weights w (r, M) or None, inverse
    temperatures inv_tau (T, 1, 1) in d's units -> out_scale * V_tau for every tau,
    (r, T, C_g, S), in the units of y. All temperatures at once: (r, T, C_g, M) buffers `bufs`
    (optional, reused across chunks: a fresh multi-MB tensor costs page faults on every
    chunk), worked on in place, and one matrix product."""
    r, C_g, M = d.shape
    T, n_neg = inv_tau.shape[0], M - C_p
    if kernel_norm == "both":
        # Logits in bits (l = -d log2(e) / tau), so every exponential is an exp2: the same
        # numbers, and torch's exp2 is several times faster than exp on our CPUs (torch 2.13).
        A, rZr = _affinity_both(d, inv_tau * (-0.5 * LOG2E), floor, bufs)  # A' = A sqrt(Zr)
        norm = out_scale / rZr.square()                              # (r, T, C_g, 1)
    else:
        A = _log_affinity(d[:, None] * -inv_tau, C_p, kernel_norm)   # log A
        if floor > 0 and kernel_norm != "none":
            A.clamp_min_(0.5 * math.log(floor))                      # sqrt(max(p, floor))
        A, norm = A.exp_(), out_scale                                # (r, T, C_g, M)
    if w is not None:
        A.mul_(w[:, None, None, :])                                  # CFG weights after norm
    # Alg. 2 step 5 as signed coefficients [-S_pos A_neg, S_neg A_pos] (rows sum to 0), then
    # one matrix product: V = S_neg (A_pos @ y_pos) - S_pos (A_neg @ y_neg). With A = A' /
    # sqrt(Zr_i) both factors carry 1 / sqrt(Zr_i): the row sums take 1 / Zr_i (and
    # out_scale), and no pass over A divides.
    A_neg, A_pos = A[..., :n_neg], A[..., n_neg:]
    S_neg = A_neg.sum(-1, keepdim=True).mul_(norm)                   # (r, T, C_g, 1)
    S_pos = A_pos.sum(-1, keepdim=True).mul_(norm)
    A_neg.mul_(-S_pos)
    A_pos.mul_(S_neg)
    # NOTE: official code computes R y - (sum_j R_ij) x; the coefficient sum is 0 up to
    # rounding, so we drop that term (~1e-7 relative, well inside the golden tolerance).
    return torch.bmm(A.view(r, T * C_g, M), y).view(r, T, C_g, -1)  # (r, T, C_g, S)


def _affinity_both(d, h, floor, bufs=None):
    """Eq. (17) with the official floor, A = sqrt(max(softmax_j(l) softmax_i(l), floor)), for
    logits in bits l = 2 h d (h = -log2(e) / (2 tau), (T, 1, 1)): all T temperatures at once.

    With m_i = min_j d_ij and n_j = min_i d_ij (where each row's and column's logit peaks),
        row_ij = 2^(h (d_ij - m_i)),   col_ij = 2^(h (d_ij - n_j)),   both in (0, 1],
    the kernel shifted by its row maximum is row^2 and by its column maximum col^2, so
        softmax_j(l) = row^2 / Zr_i,  Zr_i = sum_j row_ij^2 >= 1;  softmax_i(l) = col^2 / Zc_j,
        A = row col / sqrt(Zr_i Zc_j).
    Two exp2 per element, where log-space forms need three (row sums, column sums, A); tested
    equal to the official form in float64. Returned as A' = A sqrt(Zr_i) = row col / sqrt(Zc_j)
    and sqrt(Zr_i) (r, T, C_g, 1): V is quadratic in A (S_neg A_pos - S_pos A_neg), so the
    row factor goes into the row sums, not into another pass over A.
    Exponents are clamped at `lo`: a product of two numbers >= 2^-50 stays a normal float
    (torch's exp2 and multiplies take a slow path on denormals, measured 2x per element), and
    a term clamped up to 2^-50 is far below both the floor, which replaces it, and float32
    rounding of the sums (each >= 1). Without a floor the clamp is float32's own, 2^-126.
    """
    lo = -50.0 if floor >= 2.0 ** -96 else -126.0
    row, col = (None, None) if bufs is None else bufs
    # (addcmul: h d - h n_j in one pass, rounded like the official logits minus their max)
    col = torch.addcmul(d.amin(-2, keepdim=True)[:, None] * -h, d[:, None], h, out=col)
    col.clamp_min_(lo).exp2_()                                       # (r, T, C_g, M)
    rZc = torch.mul(col, col, out=row).sum(-2, keepdim=True).sqrt_()  # (r, T, 1, M)
    # (not an addcmul here: a row-wise (.., 1) shift broadcast along the inner dimension is
    # 4x slower than the subtraction and the multiply)
    row = torch.mul((d - d.amin(-1, keepdim=True))[:, None], h, out=row)
    row.clamp_min_(lo).exp2_()                                       # (r, T, C_g, M)
    rZr = torch.linalg.vector_norm(row, dim=-1, keepdim=True)        # (r, T, C_g, 1)
    A = row.mul_(col.mul_(rZc.reciprocal_()))                        # A'
    if floor > 0:                                                    # A >= sqrt(floor)
        A.clamp_min_(rZr * math.sqrt(floor))
    return A, rZr


def default_chunk_rows(C_g, M, S, T):
    """Rows per chunk: the chunk's two affinity buffers, targets and forces fill CHUNK_BYTES
    (float32)."""
    return max(1, CHUNK_BYTES // (4 * (2 * T * C_g * M + M * S + T * C_g * S)))


def _goal(x, pos, neg, w, taus, kernel_norm, floor, reduce, chunk_rows, memory_budget):
    """Stop-gradient part: normalized target `goal` (B, C_g, S), input scale, info dict.

    Three passes over chunks of rows, because two statistics are means over ALL rows (and
    ranks): 1. the feature scale, 2. the per-tau force RMS (it needs the scale), 3. the goal
    (it needs both). Between passes the distances and forces are kept when they fit in
    `memory_budget`, and recomputed chunk by chunk otherwise."""
    B, C_g, S = x.shape
    C_p, M, T = pos.shape[1], C_g + neg.shape[1] + pos.shape[1], len(taus)
    chunk = chunk_rows or default_chunk_rows(C_g, M, S, T)
    chunks = [slice(i, min(i + chunk, B)) for i in range(0, B, chunk)]
    keep = 4 * B * (C_g * M + M * S + T * C_g * S) <= memory_budget
    bufs = x.new_empty(2, min(chunk, B) * T * C_g * M)              # affinities, reused
    y_of = lambda r: torch.cat([x[r], neg[r], pos[r]], dim=1)       # (r, M, S) targets
    w_of = lambda r: None if w is None else w[r]

    # Pass 1. Feature normalization (Eq. 18-22): one scalar per group over all rows so that
    # the mean weighted distance is 1; coordinates scaled so it is sqrt(S) (tau_j = tau sqrt S).
    # Sums are taken per row, then accumulated in float64, so the statistics do not depend on
    # how rows are split into chunks or ranks (1e-7 in the scale is 1e-6 in the loss at tau
    # = 0.02: d / tau amplifies it).
    acc, dists, ys = x.new_zeros(2, dtype=torch.float64), [], []
    for r in chunks:
        y = y_of(r)                                                  # (r, M, S)
        d = _cdist(x[r], y)                                          # (r, C_g, M)
        d_j = d.sum(1)                                               # (r, M) summed over i
        wd = d_j.sum(1) if w is None else (d_j * w[r]).sum(1)        # (r,)
        wsum = C_g * (w[r].sum(1) if w is not None else d.new_full((len(wd),), M))
        acc += torch.stack([wd.double().sum(), wsum.double().sum()])
        dists.append(d if keep else None)
        ys.append(y if keep else None)
    stats = reduce(torch.cat([acc, acc.new_tensor([B])]))            # sum over ranks
    scale = (stats[0] / stats[1]).float()                            # mean(w d) / mean(w)
    s_in = (scale / math.sqrt(S)).clamp_min(1e-3)

    # Distances are normalized by `scale` (mean ~1) through the temperatures: d / (tau scale).
    d_unit = scale.clamp_min(1e-3)
    inv_tau = 1.0 / (x.new_tensor(taus)[:, None, None] * d_unit)    # (T, 1, 1)

    def forces(i, r):                                                # (r, T, C_g, S) / s_in
        y = ys[i] if keep else y_of(r)
        d = dists[i] if keep else _cdist(x[r], y)                    # (r, C_g, M)
        # Self-mask: +100 on the normalized gen-gen diagonal, i.e. +100 d_unit on the raw one
        # (official; the notebook adds 1e6 to raw distances).
        d[:, :, :C_g].diagonal(dim1=-2, dim2=-1).add_(100.0 * d_unit)
        n = len(d) * T * C_g * M
        A = [b[:n].view(len(d), T, C_g, M) for b in bufs]
        return _forces(d, y, w_of(r), C_p, inv_tau, kernel_norm, floor, 1.0 / s_in, A)

    # Pass 2. Drift normalization (Eq. 23-25): mean square of each tau's field, all rows.
    sq, kept = x.new_zeros(T, dtype=torch.float64), []
    for i, r in enumerate(chunks):
        V = forces(i, r)                                             # (r, T, C_g, S)
        sq += torch.linalg.vector_norm(V, dim=(2, 3)).double().square().sum(0)   # (T,)
        kept.append(V if keep else None)
        dists[i] = ys[i] = None                                      # free as we go
    V2 = (reduce(sq) / (stats[2] * C_g * S)).float()                 # (T,) mean(V_tau^2)
    info = {"scale": scale, **{f"loss_{tau}": V2[t] for t, tau in enumerate(taus)}}

    # Pass 3. Goal = x + sum_tau V_tau / sqrt(mean V_tau^2), in normalized coordinates.
    inv = V2.clamp_min(1e-8).rsqrt()                                 # (T,)
    goal = torch.div(x, s_in)                                        # (B, C_g, S)
    for i, r in enumerate(chunks):
        V = kept[i] if keep else forces(i, r)
        kept[i] = None
        for t in range(T):
            goal[r].addcmul_(V[:, t], inv[t])
    return goal, s_in, info


if __name__ == "__main__":
    torch.manual_seed(0)
    y = torch.randn(512, 2) * 0.3 + torch.tensor([1.0, 0.0])        # data p
    x = torch.randn(512, 2) * 0.3 - torch.tensor([1.0, 0.0])        # generated q
    V = drift_field(x, y, x, tau=0.2)
    print(f"drift_field: mean V = {V.mean(0).tolist()} (points right, toward p)")
    print(f"p = q: |V| = {drift_field(y, y, y.clone(), mask_self=False).abs().max():.2e}")
    gen = torch.randn(4, 16, 8, requires_grad=True)
    loss, info = drift_loss(gen, torch.randn(4, 16, 8) + 1.0)
    loss.sum().backward()
    print("drift_loss:", loss.detach().numpy().round(3), {k: f"{v:.3g}" for k, v in info.items()})
