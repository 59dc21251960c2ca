"""Tests of field_fast.py: the same numbers as the reference field.drift_loss, on every path."""
import glob
import json
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import field
import field_fast

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = sorted(glob.glob(os.path.join(FIXTURES, "drift_*.safetensors")))


def rel_err(a, b):
    """max|a - b| / max|b|, the golden README's metric."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def both(args, kwargs, **fast_kwargs):
    """(loss, info, d sum(loss) / d gen) of the reference and of the fast path."""
    out = []
    for fn, extra in ((field.drift_loss, {}), (field_fast.drift_loss, fast_kwargs)):
        gen = args[0].clone().requires_grad_(True)
        loss, info = fn(gen, *args[1:], **kwargs, **extra)
        loss.sum().backward()
        out.append((loss.detach(), info, gen.grad))
    return out


# float32 rounding: the fast path sums in another order, and the CPU's kernels pick theirs
# (the golden case c's gradient: 1.02e-6 on an AMD EPYC, under 1e-6 on the earlier machines)
TOL = 4e-6


def assert_same_numbers(ref, fast):
    assert rel_err(fast[0], ref[0]) < TOL
    assert rel_err(fast[2], ref[2]) < TOL
    assert fast[1].keys() == ref[1].keys()
    for k in ref[1]:
        assert rel_err(fast[1][k].reshape(1), ref[1][k].reshape(1)) < TOL, k


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[6:-12])
def test_fast_equals_reference_on_the_golden_cases(path):
    """Loss, info and gradient equal the reference's to TOL on the 7 official cases (no
    negatives, CFG weights, scales 1e-4..1e3, one tau, reversed taus)."""
    t = load_file(path)
    with safe_open(path, "pt") as f:
        taus = tuple(json.loads(f.metadata()["R_list"]))
    args = (t["gen"], t["fixed_pos"], t.get("fixed_neg"), t.get("weight_gen"),
            t.get("weight_pos"), t.get("weight_neg"))
    assert_same_numbers(*both(args, dict(taus=taus)))


@pytest.mark.parametrize("chunk_rows,budget", [(None, 2 ** 31), (2, 2 ** 40), (3, 0)])
def test_fast_equals_reference_chunked_and_recomputed(chunk_rows, budget):
    """Row chunks, and a zero memory budget (distances and forces recomputed per pass), give
    the reference's whole-computation numbers to TOL."""
    g = torch.Generator().manual_seed(0)
    gen, pos, neg = (torch.randn(7, n, 16, generator=g) for n in (12, 10, 4))
    w_neg = torch.rand(7, 4, generator=g) * 2
    ref, fast = both((gen, pos, neg), dict(w_neg=w_neg), chunk_rows=chunk_rows,
                     memory_budget=budget)
    assert_same_numbers(ref, fast)


def test_fast_all_reduce_split_equals_reference():
    """Rows split over two "ranks" (threads) whose statistics all_reduce sums give the
    reference's loss on all rows, to TOL."""
    g = torch.Generator().manual_seed(1)
    gen, pos, neg = (torch.randn(6, n, 8, generator=g) for n in (10, 12, 3))
    whole, _ = field.drift_loss(gen, pos, neg)
    barrier, box, out = threading.Barrier(2), {}, {}

    def worker(rank):
        def all_reduce(t):                                           # sum over the 2 ranks
            box[rank] = t
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            return total
        rows = slice(3 * rank, 3 * rank + 3)
        out[rank] = field_fast.drift_loss(gen[rows], pos[rows], neg[rows],
                                          all_reduce=all_reduce)[0]

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert rel_err(torch.cat([out[0], out[1]]), whole) < TOL


@pytest.mark.parametrize("a,b", [(1.5, 1.0), (1.0, 1.5), (1.0, 0.0), (2.0, 2.0)])
def test_fast_attract_repel_equals_reference(a, b):
    """V = a V+ - b V- (Tab. 1) with CFG weights, chunked: the reference's numbers to TOL; for
    a != b the coefficients no longer sum to 0 and the - sum_m R_m x term must be kept."""
    g = torch.Generator().manual_seed(3)
    gen, pos, neg = (torch.randn(5, n, 16, generator=g) for n in (8, 32, 4))
    w_neg = torch.rand(5, 4, generator=g) * 2
    assert_same_numbers(*both((gen, pos, neg), dict(w_neg=w_neg, a=a, b=b), chunk_rows=2))


def test_other_kernel_norms_fall_back_to_the_reference():
    """kernel_norm other than "both", or the Gaussian kernel, is the reference's computation,
    bit for bit."""
    g = torch.Generator().manual_seed(2)
    gen, pos = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    for kw in (dict(kernel_norm="y"), dict(kernel_norm="none"), dict(kernel_norm="per_set"),
               dict(kernel_norm="sinkhorn", sinkhorn_iters=3), dict(kernel="gaussian")):
        assert torch.equal(field_fast.drift_loss(gen, pos, **kw)[0],
                           field.drift_loss(gen, pos, **kw)[0])
