"""Tests of field.py: golden parity with the official JAX drift_loss, and the paper's claims."""
import glob
import inspect
import json
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from field import drift_field, drift_loss

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = sorted(glob.glob(os.path.join(FIXTURES, "drift_*.safetensors")))


def rel_err(a, b):
    """The golden README's metric: max|a - b| / max|b| per tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def loss_info_grad(gen, pos, neg, w_neg, **kw):
    """drift_loss on a fresh leaf copy of gen -> (loss, info, d sum(loss) / d gen)."""
    x = gen.clone().requires_grad_(True)
    loss, info = drift_loss(x, pos, neg, w_neg=w_neg, **kw)
    loss.sum().backward()
    return loss.detach(), info, x.grad


def test_all_golden_cases_present():
    """The 7 official cases a-g are all copied into tests/fixtures (none silently skipped)."""
    names = [os.path.basename(c)[6:7] for c in CASES]
    assert names == list("abcdefg")


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[6:-12])
def test_drift_loss_matches_official(path):
    """loss, every info entry and d(sum loss)/d(gen) equal the official JAX drift_loss."""
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    taus = tuple(json.loads(meta["R_list"]))                       # config order, e.g. case f
    gen = t["gen"].clone().requires_grad_(True)
    loss, info = drift_loss(gen, t["fixed_pos"], t.get("fixed_neg"), t.get("weight_gen"),
                            t.get("weight_pos"), t.get("weight_neg"), taus=taus)
    loss.sum().backward()

    assert rel_err(loss.detach(), t["loss"]) < 1e-4
    expected_info = {k[5:] for k in t if k.startswith("info/")}
    assert set(info) == expected_info
    for k, v in info.items():
        assert rel_err(v.reshape(1), t[f"info/{k}"]) < 1e-4, k
    grad_tol = 1e-3 if meta["case"] in ("e_scale1e3", "g_tiny1e-4") else 1e-4
    assert rel_err(gen.grad, t["grad_gen"]) < grad_tol


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("kernel_norm", ["both", "y", "none", "per_set", "sinkhorn"])
def test_field_antisymmetric(kernel_norm, kernel):
    """Prop. 3.1: V_{p,q}(x) = -V_{q,p}(x), for every kernel and normalization, also with
    a = b != 1; for a != b (Tab. 1) swapping p and q swaps the roles of a and b instead."""
    g = torch.Generator().manual_seed(0)
    x, p, q = (torch.randn(n, 3, generator=g) for n in (20, 30, 25))
    kw = dict(tau=0.5, kernel_norm=kernel_norm, kernel=kernel, mask_self=False)
    V_pq = drift_field(x, p, q, **kw)
    assert V_pq.abs().max() > 1e-3                                   # a real, nonzero field
    torch.testing.assert_close(V_pq, -drift_field(x, q, p, **kw), atol=1e-6, rtol=1e-5)
    V_pq = drift_field(x, p, q, a=1.5, b=1.5, **kw)
    torch.testing.assert_close(V_pq, -drift_field(x, q, p, a=1.5, b=1.5, **kw),
                               atol=1e-6, rtol=1e-5)
    V_pq = drift_field(x, p, q, a=1.5, b=1.0, **kw)
    torch.testing.assert_close(V_pq, -drift_field(x, q, p, a=1.0, b=1.5, **kw),
                               atol=1e-6, rtol=1e-5)
    assert (V_pq + drift_field(x, q, p, a=1.5, b=1.0, **kw)).abs().max() > 1e-3


@pytest.mark.parametrize("kernel_norm", ["both", "y", "none", "per_set"])
def test_field_zero_at_equilibrium(kernel_norm):
    """p = q => V = 0: with identical positive and negative sets the pull and push cancel."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 2, generator=g), torch.randn(50, 2, generator=g)
    V = drift_field(x, y, y.clone(), tau=0.3, kernel_norm=kernel_norm)
    # A different negative set gives a clearly nonzero field (so the check can fail); the
    # equilibrium field is zero up to float rounding relative to that magnitude.
    V_off = drift_field(x, y, y + 0.5, tau=0.3, kernel_norm=kernel_norm)
    assert V_off.abs().max() > 1e-2
    assert V.abs().max() < 1e-5 * V_off.abs().max()


def test_seed_000_worked_example():
    """The worked numbers of seed 000 (three clean points, three generated, tau = 0.5).

    That example normalizes V+ over the clean points and V- over the other generated points
    separately (Eq. 8-11 as written): kernel_norm="per_set" with the self term masked.
    The expected values are recomputed here by hand from the example's formulas.
    """
    clean = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, -1.0]])
    gen = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5]])
    tau = 0.5

    def mean_shift(x, ys):                                           # the seed's V+ / V-
        k = [math.exp(-math.dist(x, y) / tau) for y in ys]
        return [sum(ki * (y[d] - x[d]) for ki, y in zip(k, ys)) / sum(k) for d in range(2)]

    pts = gen.tolist()
    expected = []
    for i, x in enumerate(pts):
        vp, vm = mean_shift(x, clean.tolist()), mean_shift(x, pts[:i] + pts[i + 1:])
        expected.append([vp[0] - vm[0], vp[1] - vm[1]])
    V = drift_field(gen, clean, gen, tau=tau, kernel_norm="per_set")
    torch.testing.assert_close(V, torch.tensor(expected), atol=1e-6, rtol=1e-5)
    # gen[0] = (0.5, 0): V+ = (-0.1692, 0.1128), V- = (-0.6788, 0.3212), V = (0.5096, -0.2084)
    torch.testing.assert_close(V[0], torch.tensor([0.50964, -0.20843]), atol=1e-4, rtol=0)


def test_notebook_form():
    """kernel_norm="both" equals the toy notebook's raw-kernel k / sqrt(rowsum * colsum) form."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 2, generator=g), torch.randn(40, 2, generator=g) + 1
    tau = 0.3
    t = torch.cat([x, y])
    dist = torch.cdist(x, t)
    dist[:, :30].fill_diagonal_(1e6)
    k = (-dist / tau).exp()
    k = k / (k.sum(-1, keepdim=True) * k.sum(-2, keepdim=True)).sqrt()
    V_ref = (k[:, 30:] * k[:, :30].sum(-1, keepdim=True)) @ y \
        - (k[:, :30] * k[:, 30:].sum(-1, keepdim=True)) @ x
    torch.testing.assert_close(drift_field(x, y, x, tau=tau), V_ref, atol=1e-6, rtol=1e-4)


def test_field_fixed_point_loss_value_is_V_squared():
    """Eq. (6): with the target stop-gradient(x + V), the loss value is ||V||^2 and its
    gradient w.r.t. x is -2V/N per element (the field drives the update)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, generator=g).requires_grad_(True)
    y = torch.randn(64, 2, generator=g) + 2.0
    xd = x.detach()
    V = drift_field(xd, y, xd, tau=0.5)
    loss = F.mse_loss(x, (x + V).detach())
    loss.backward()
    torch.testing.assert_close(loss.detach(), (V ** 2).mean())
    torch.testing.assert_close(x.grad, -2 * V / V.numel())


def test_no_gradient_into_targets():
    """Real features are under stop-gradient: pos and neg get no gradient, gen does."""
    g = torch.Generator().manual_seed(4)
    gen = torch.randn(3, 8, 4, generator=g).requires_grad_(True)
    pos = torch.randn(3, 6, 4, generator=g).requires_grad_(True)
    neg = torch.randn(3, 2, 4, generator=g).requires_grad_(True)
    loss, _ = drift_loss(gen, pos, neg)
    loss.sum().backward()
    assert pos.grad is None and neg.grad is None
    assert gen.grad.abs().sum() > 0


@pytest.mark.parametrize("c", [1e-4, 1e-2, 1.0, 1e2, 1e4])
def test_drift_loss_finite_and_scale_invariant(c):
    """No NaN/inf for inputs scaled 1e-4..1e4; above the 1e-3 clip the loss and info/loss_tau
    do not depend on the input scale (feature normalization, App. A.6)."""
    g = torch.Generator().manual_seed(5)
    gen, pos, neg = (torch.randn(2, n, 16, generator=g) for n in (12, 10, 4))
    base, base_info = drift_loss(gen, pos, neg)
    gen_c = (gen * c).requires_grad_(True)
    loss, info = drift_loss(gen_c, pos * c, neg * c)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(gen_c.grad).all()
    assert all(torch.isfinite(v) for v in info.values())
    if c >= 1e-2:  # s / sqrt(S) > 1e-3: no clip active
        torch.testing.assert_close(loss, base, rtol=1e-4, atol=0)
        torch.testing.assert_close(info["loss_0.05"], base_info["loss_0.05"], rtol=1e-4, atol=0)


def test_drift_field_tiny_tau_is_finite():
    """With d/tau in the thousands every raw exp(-d/tau) underflows to 0: the notebook's
    raw-kernel normalization then returns V = 0 (and 0/0 without its clamp). The log-space
    softmax keeps the field: here x0 is pulled to y0 = (3, 0) and pushed from x1 = (-3, 0)."""
    x = torch.tensor([[0.0, 0.0], [-3.0, 0.001]])
    y = torch.tensor([[3.0, 0.0], [40.0, 40.0]])
    V = drift_field(x, y, x, tau=1e-3)                               # d/tau ~ 3000..60000
    assert torch.isfinite(V).all()
    torch.testing.assert_close(V[0], torch.tensor([3.0, 0.0]), atol=1e-3, rtol=0)
    assert (-torch.cdist(x, y) / 1e-3).exp().max() == 0             # the raw kernel is gone
    for kernel_norm in ("y", "none", "per_set"):
        assert torch.isfinite(drift_field(x, y, x, tau=1e-3, kernel_norm=kernel_norm)).all()


def test_bf16_inputs_under_autocast_compute_in_float32():
    """Called under bf16 autocast with bf16 inputs, the loss is float32 and equals the float32
    computation on the same (bf16-rounded) values."""
    g = torch.Generator().manual_seed(6)
    gen, pos = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    gen16, pos16 = gen.bfloat16(), pos.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = drift_loss(gen16, pos16)
    loss32, _ = drift_loss(gen16.float(), pos16.float())
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32)


def test_kernel_norm_switch():
    """The Tab. 11 ablation switch changes the field; an unknown value is a clear error."""
    g = torch.Generator().manual_seed(7)
    gen, pos = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    losses = {k: drift_loss(gen, pos, kernel_norm=k)[0] for k in ("both", "y", "none")}
    assert not torch.allclose(losses["both"], losses["y"])
    assert not torch.allclose(losses["both"], losses["none"])
    with pytest.raises(ValueError, match="kernel_norm"):
        drift_loss(gen, pos, kernel_norm="rows")


def test_all_reduce_split_equals_whole():
    """A group split over two "ranks" whose statistics are summed by all_reduce gives exactly
    the rows of the single-process loss (scale and force RMS are means over ALL rows)."""
    g = torch.Generator().manual_seed(8)
    gen, pos, neg = (torch.randn(6, n, 8, generator=g) for n in (10, 12, 3))
    w_neg = torch.rand(6, 3, generator=g) * 3
    whole, whole_info = drift_loss(gen, pos, neg, w_neg=w_neg)

    barrier, box, out = threading.Barrier(2), {}, {}

    def fake_all_reduce(rank):
        def reduce(t):
            box[rank] = t
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            return total
        return reduce

    def worker(rank, rows):
        out[rank] = drift_loss(gen[rows], pos[rows], neg[rows], w_neg=w_neg[rows],
                               all_reduce=fake_all_reduce(rank))

    threads = [threading.Thread(target=worker, args=(r, slice(3 * r, 3 * r + 3)))
               for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), whole)
    for k in whole_info:
        torch.testing.assert_close(out[1][1][k], whole_info[k])
    # Without the reduction each half normalizes by its own statistics: a different loss.
    alone, _ = drift_loss(gen[:3], pos[:3], neg[:3], w_neg=w_neg[:3])
    assert not torch.allclose(alone, whole[:3])


@pytest.mark.parametrize("chunk_rows,budget", [(1, 2**40), (3, 2**40), (2, 0), (5, 0)])
def test_chunked_equals_whole(chunk_rows, budget):
    """Chunking the rows (and, with a zero memory budget, recomputing each chunk per pass
    instead of keeping distances and forces) gives the whole computation's loss, info and
    gradient to 1e-6 relative: the global scale and force RMS are reduced over all chunks
    (per-row sums accumulated in float64, so the split does not change them)."""
    g = torch.Generator().manual_seed(9)
    gen, pos, neg = (torch.randn(7, n, 16, generator=g) for n in (12, 10, 4))
    w_neg = torch.rand(7, 4, generator=g) * 2

    run = lambda **kw: loss_info_grad(gen, pos, neg, w_neg, **kw)

    whole = run(chunk_rows=7, memory_budget=2**40)
    part = run(chunk_rows=chunk_rows, memory_budget=budget)
    assert rel_err(part[0], whole[0]) < 1e-6
    assert rel_err(part[2], whole[2]) < 1e-6
    for k in whole[1]:
        assert rel_err(part[1][k].reshape(1), whole[1][k].reshape(1)) < 1e-6


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("budget", [2 ** 40, 0])
def test_given_stats_make_micro_batches_one_step(fast, budget):
    """Micro-batches (train.py --micro-groups): the stats (info) of a no-grad call on ALL rows,
    given to a call per part of the rows, make the parts' losses and gradients those of the
    whole call (1e-6 relative), with kept and with recomputed chunks; each part's info is the
    whole step's. Without them each part normalizes by its own statistics: another loss."""
    import field_fast
    loss_fn = field_fast.drift_loss if fast else drift_loss
    g = torch.Generator().manual_seed(13)
    gen, pos, neg = (torch.randn(8, n, 16, generator=g) for n in (12, 10, 4))
    w_neg = torch.rand(8, 4, generator=g) * 2
    x = gen.clone().requires_grad_(True)
    whole, whole_info = loss_fn(x, pos, neg, w_neg=w_neg, memory_budget=budget)
    whole.sum().backward()
    with torch.no_grad():
        _, stats = loss_fn(gen, pos, neg, w_neg=w_neg)
    y = gen.clone().requires_grad_(True)
    parts = [loss_fn(y[r], pos[r], neg[r], w_neg=w_neg[r], stats=stats, memory_budget=budget)
             for r in (slice(0, 3), slice(3, 4), slice(4, 8))]
    torch.cat([p[0] for p in parts]).sum().backward()
    assert rel_err(torch.cat([p[0] for p in parts]).detach(), whole.detach()) < 1e-6
    assert rel_err(y.grad, x.grad) < 1e-6
    for k in whole_info:
        assert rel_err(parts[1][1][k].reshape(1), whole_info[k].reshape(1)) < 1e-6
    alone, _ = loss_fn(gen[:3], pos[:3], neg[:3], w_neg=w_neg[:3])
    assert rel_err(alone, whole[:3].detach()) > 1e-3
    # The statistics from the parts alone (step.generator_step's two no-grad sweeps): the
    # parts' distance sums give the scale; given it, their V^2 sums give the force RMS.
    cut = (slice(0, 3), slice(3, 4), slice(4, 8))
    part = lambda r, stats: loss_fn(gen[r], pos[r], neg[r], w_neg=w_neg[r], stats=stats)[1]
    sums = sum(part(r, {})["sums"] for r in cut)
    scale = (sums[0] / sums[1]).float()
    V2 = sum(part(r, {"scale": scale})["sums"][3:] for r in cut) / sums[2]     # elements
    assert rel_err(scale.reshape(1), whole_info["scale"].reshape(1)) < 1e-6
    for t, tau in enumerate((0.02, 0.05, 0.2)):
        assert rel_err(V2[t].float().reshape(1), whole_info[f"loss_{tau}"].reshape(1)) < 1e-6


def test_drift_field_keeps_self_mask_and_dtype_for_float64():
    """A float64 x passed as its own negatives keeps the self-mask (the check `y_neg is x`
    comes before any cast) and comes back float64, equal to the float32 field."""
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(20, 2, generator=g, dtype=torch.float64)
    y64 = torch.randn(30, 2, generator=g, dtype=torch.float64)
    V64 = drift_field(x64, y64, x64, tau=0.3)
    x32, y32 = x64.float(), y64.float()
    V32 = drift_field(x32, y32, x32, tau=0.3)
    assert V64.dtype == torch.float64
    torch.testing.assert_close(V64.float(), V32, atol=1e-5, rtol=1e-4)
    unmasked = drift_field(x64, y64, x64, tau=0.3, mask_self=False)
    assert (unmasked - V64).abs().max() > 1e-2                       # the mask matters here


def _pasted(fn):
    """`fn` rebuilt from its source text alone, in a namespace holding only math and torch:
    what a reader gets by pasting it into a notebook."""
    namespace = {}
    exec("import math, torch\n" + inspect.getsource(fn), namespace)
    return namespace[fn.__name__]


def test_pasted_drift_field_runs_the_seed_example():
    """drift_field pasted alone (only `import math, torch`) reproduces the seed-000 worked
    example (gen[0] = (0.5, 0) -> V = (0.5096, -0.2084)) and the module's own output."""
    pasted = _pasted(drift_field)
    clean = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, -1.0]])
    gen = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5]])
    V = pasted(gen, clean, gen, tau=0.5, kernel_norm="per_set")
    torch.testing.assert_close(V[0], torch.tensor([0.50964, -0.20843]), atol=1e-4, rtol=0)
    torch.testing.assert_close(pasted(gen, clean, gen, tau=0.5),
                               drift_field(gen, clean, gen, tau=0.5))


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[6:-12])
def test_pasted_drift_loss_matches_official(path):
    """drift_loss pasted alone (only `import math, torch`) matches every golden case: loss,
    info and gradient at the golden tolerances."""
    pasted = _pasted(drift_loss)
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    gen = t["gen"].clone().requires_grad_(True)
    loss, info = pasted(gen, t["fixed_pos"], t.get("fixed_neg"), t.get("weight_gen"),
                        t.get("weight_pos"), t.get("weight_neg"),
                        taus=tuple(json.loads(meta["R_list"])))
    loss.sum().backward()
    assert rel_err(loss.detach(), t["loss"]) < 1e-4
    for k, v in info.items():
        assert rel_err(v.reshape(1), t[f"info/{k}"]) < 1e-4, k
    grad_tol = 1e-3 if meta["case"] in ("e_scale1e3", "g_tiny1e-4") else 1e-4
    assert rel_err(gen.grad, t["grad_gen"]) < grad_tol


# --- Ablations (issue 18): a V+ - b V- (Tab. 1), Sinkhorn couplings, the Gaussian kernel ---


def test_ablation_defaults_are_bitwise_the_default():
    """a = b = 1, kernel="laplace", kernel_norm="both" passed explicitly are the default path
    bit for bit (loss, info, gradient, field): the ablation switches cost the default nothing."""
    g = torch.Generator().manual_seed(12)
    gen, pos, neg = (torch.randn(3, n, 8, generator=g) for n in (10, 12, 3))
    w_neg = torch.rand(3, 3, generator=g) * 2

    run = lambda **kw: loss_info_grad(gen, pos, neg, w_neg, **kw)

    ref, new = run(), run(a=1.0, b=1.0, kernel="laplace", kernel_norm="both", sinkhorn_iters=3)
    assert torch.equal(ref[0], new[0]) and torch.equal(ref[2], new[2])
    assert all(torch.equal(ref[1][k], new[1][k]) for k in ref[1])
    x, y = gen[0], pos[0]
    for kernel_norm in ("both", "per_set"):
        assert torch.equal(drift_field(x, y, x, tau=0.5, kernel_norm=kernel_norm),
                           drift_field(x, y, x, tau=0.5, kernel_norm=kernel_norm, a=1.0, b=1.0,
                                       kernel="laplace"))


def test_sinkhorn_coupling_has_its_marginals():
    """kernel_norm="sinkhorn" uses the Sinkhorn coupling of the docstring: it equals the
    textbook multiplicative scaling (divide rows by their sums, then columns by theirs times
    N / M), whose rows sum to 1 and columns to N / M after 200 steps (8 x 12, tau not tiny)."""
    g = torch.Generator().manual_seed(13)
    x, p, q = (torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (8, 5, 7))
    N, M, tau = 8, 12, 0.5
    K = (-torch.cdist(x, torch.cat([q, p])) / tau).exp()            # (N, M), y_neg first
    for _ in range(200):
        K = K / K.sum(1, keepdim=True)
        K = K / K.sum(0, keepdim=True) * (N / M)
    torch.testing.assert_close(K.sum(1), torch.ones(N, dtype=K.dtype), atol=1e-4, rtol=0)
    torch.testing.assert_close(K.sum(0), torch.full((M,), N / M, dtype=K.dtype), atol=1e-4,
                               rtol=0)
    A_neg, A_pos = K[:, :7], K[:, 7:]
    V_ref = (A_pos * A_neg.sum(1, keepdim=True)) @ p - (A_neg * A_pos.sum(1, keepdim=True)) @ q
    V = drift_field(x, p, q, tau=tau, kernel_norm="sinkhorn", sinkhorn_iters=200)
    torch.testing.assert_close(V, V_ref, atol=1e-10, rtol=1e-8)
    # the coupling is neither a row softmax ("y") nor Eq. (17) ("both"): a different field
    for other in ("y", "both"):
        assert (drift_field(x, p, q, tau=tau, kernel_norm=other) - V).abs().max() > 1e-3


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (1.5, 1.0), (1.0, 0.0)])
def test_gaussian_per_set_is_tweedie(a, b):
    """kernel="gaussian" is exp(-d^2 / (2 tau^2)): with "per_set", V+ and V- are plain
    softmax mean shifts (A_neg rows sum to 1, so W_pos = A_pos), and by Tweedie
    a V+ - b V- = tau^2 (a d/dx log p_tau - b d/dx log q_tau), p_tau = mean_j N(y_j, tau^2).
    b = 0 ("V+ only") and a != b check that V keeps the mean-shift form (y - x)."""
    g = torch.Generator().manual_seed(14)
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]      # (7, 1)
    y_pos = torch.randn(5, 1, generator=g, dtype=torch.float64) + 1
    y_neg = torch.randn(6, 1, generator=g, dtype=torch.float64) - 1
    sigma = 0.7

    def score(y):                                                    # d/dx log p_sigma(x)
        xg = x.clone().requires_grad_(True)
        log_p = torch.logsumexp(-(xg - y.T) ** 2 / (2 * sigma ** 2), dim=1)
        return torch.autograd.grad(log_p.sum(), xg)[0]              # (7, 1)

    V_ref = sigma ** 2 * (a * score(y_pos) - b * score(y_neg))
    kw = dict(tau=sigma, kernel_norm="per_set", mask_self=False, a=a, b=b)
    V = drift_field(x, y_pos, y_neg, kernel="gaussian", **kw)
    assert V.abs().max() > 1e-2
    torch.testing.assert_close(V, V_ref, atol=1e-8, rtol=0)
    assert (drift_field(x, y_pos, y_neg, kernel="laplace", **kw) - V_ref).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(kernel="gaussian"), dict(kernel_norm="sinkhorn"),
                                dict(kernel="gaussian", kernel_norm="sinkhorn"),
                                dict(a=1.5), dict(b=1.5), dict(b=0.0), dict(a=2.0, b=1.0)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_drift_loss_ablations_run(kw):
    """Each ablation option gives a finite loss and gradient that differ from the default,
    also with CFG negatives; a = b = 2 gives the default loss (drift normalization, Eq. 23-25,
    removes a common factor: only a / b matters)."""
    g = torch.Generator().manual_seed(15)
    gen, pos, neg = (torch.randn(2, n, 8, generator=g) for n in (10, 12, 3))
    w_neg = torch.rand(2, 3, generator=g) * 2
    base, _ = drift_loss(gen, pos, neg, w_neg=w_neg)
    x = gen.clone().requires_grad_(True)
    loss, info = drift_loss(x, pos, neg, w_neg=w_neg, **kw)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(v) for v in info.values())
    assert not torch.allclose(loss, base, rtol=1e-3)
    both, _ = drift_loss(gen, pos, neg, w_neg=w_neg, a=2.0, b=2.0)
    torch.testing.assert_close(both, base, rtol=1e-5, atol=0)


def test_drift_loss_unequal_ab_is_translation_invariant():
    """For a != b the official "coefficients sum to 0" term no longer vanishes; it is what
    makes V = sum_m R_m (y_m - x) = a V+ - b V- of the mean-shift form, so shifting all
    features by a constant leaves the loss unchanged (it would not for sum_m R_m y_m)."""
    g = torch.Generator().manual_seed(16)
    gen, pos = torch.randn(2, 10, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    for a, b in ((1.5, 1.0), (1.0, 0.0)):
        loss, _ = drift_loss(gen, pos, a=a, b=b)
        torch.testing.assert_close(drift_loss(gen + 3.0, pos + 3.0, a=a, b=b)[0], loss,
                                   rtol=1e-4, atol=0)


def test_bad_kernel_values_raise():
    """An unknown kernel or kernel_norm is a ValueError naming the value and the choices."""
    x, y = torch.randn(4, 2), torch.randn(5, 2)
    gen, pos = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    for fn, args in ((drift_field, (x, y, x)), (drift_loss, (gen, pos))):
        with pytest.raises(ValueError, match="'cauchy': expected laplace or gaussian"):
            fn(*args, kernel="cauchy")
        with pytest.raises(ValueError, match="'foo': expected both, y, none, per_set or sink"):
            fn(*args, kernel_norm="foo")
