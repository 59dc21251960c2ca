"""
How much GPU memory one train.py generator step takes, and how to split it to fit: an
estimate that needs no GPU (the step run on fake tensors), and the probe of --micro-groups auto
on the GPU itself.

The estimate runs the real step (step.generator_step: the DriftDiT forward and backward, the
frozen encoders, the drift loss) on fake tensors (torch's FakeTensorMode: shapes and dtypes,
no data, no compute), while a dispatch mode adds up the bytes of every live storage and keeps
the peak. CUDA's bf16 autocast is emulated: CPU autocast casts matmuls and convolutions to bf16
as CUDA's does (saving the bf16 copies for the backward, as on a GPU), and a function mode adds
CUDA's float32 list (norms, softmax, exp, pow, sums: float32 outputs). The fp32 weights, their
gradients (DDP's buckets, with gradient_as_bucket_view), AdamW's two moments and the EMA are
allocated as the run allocates them. Not counted: the CUDA context, cuBLAS and NCCL workspaces,
the caching allocator's fragmentation; a plan keeps 10% of the GPU for them. An estimate.

    python memory.py          # the paper's recipes on 8 x 80 GB: before and with their plans
    python memory.py --models --mae-batch 128 256 512 1024  # the MAE stage under FSDP
"""
import argparse

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import field
import field_fast
from config import RECIPES
from convnext import ConvNeXt_models, ConvNeXtV2, pixel_feature_groups
from encoder import ACTIVATION_KWARGS, MAE_models, BasicBlock, MAEConfig, MAEResNet, UpBlock
from models import DriftDiT, DriftDiT_models, DriftDiTConfig
from step import generator_step

GiB = 2 ** 30
# CUDA autocast's "ops that can autocast to float32" (torch.amp docs) that these models call
CUDA_FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "exp", "pow", "__pow__",
             "rsqrt", "sum", "norm", "vector_norm", "cdist", "mse_loss", "cumsum", "prod", "log",
             "reciprocal", "logsumexp", "softplus", "normalize"}


class CudaFloat32Ops(TorchFunctionMode):
    """Under (CPU) autocast, the ops of CUDA's float32 list get float32 inputs, as on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.is_autocast_enabled("cpu") and getattr(func, "__name__", "") in CUDA_FP32:
            up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 \
                else t
            args, kwargs = tree_map(up, args), tree_map(up, kwargs or {})
        return func(*args, **(kwargs or {}))


class PeakBytes(TorchDispatchMode):
    """The bytes of live storages (every op's outputs; a storage lives while a tensor holds
    it) and their peak while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def free(self):                                 # forget the storages no tensor holds
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata in self.live:          # a view, an in-place op's output, or
                    if not self.live[ref.cdata][0].expired():     # a freed storage's address
                        continue
                    self.free()
                n = t.untyped_storage().nbytes()
                self.live[ref.cdata] = (ref, n)
                self.now += n
                if self.now > self.peak:            # maybe a new peak: count the frees first
                    self.free()
                    self.peak = max(self.peak, self.now)
        return out


def estimate(model, groups, micro=None, gen=64, pos=64, unc=32, mae="latent_640", convnext=None,
             grad_checkpoint=False, mae_bf16=True, fast_loss=False, taus=(0.2, 0.05, 0.02),
             exact=True):
    """Bytes at the peak of one generator step on one GPU: `groups` class groups of `gen`
    generated, `pos` positive and `unc` unconditional samples, `micro` per pass (default: all),
    under bf16 autocast. -> {"peak": bytes, "fixed": bytes before the step, "params": DiT}.
    Two passes are run (every pass holds the same); the whole step's draw is allocated.
    exact=False: without the statistics sweeps (--micro-stats pass)."""
    cfg = DriftDiTConfig(**{**DriftDiT_models[model], "grad_checkpoint": grad_checkpoint})
    with torch.device("meta"):                      # built without data, then made fake
        net, phi = DriftDiT(cfg), MAEResNet(MAEConfig(**MAE_models[mae]), with_heads=False)
        phi = phi.to(torch.bfloat16 if mae_bf16 else torch.float32)
        cn = ConvNeXtV2(**ConvNeXt_models[convnext]) if convnext else None
    with FakeTensorMode(allow_non_fake_inputs=True), PeakBytes() as mem, CudaFloat32Ops():
        net = net.to_empty(device="cpu").train()
        params = list(net.parameters())
        state = [torch.zeros_like(p) for p in params for _ in range(3)]  # EMA, AdamW m and v
        phi = phi.to_empty(device="cpu").eval().requires_grad_(False)
        if convnext:                                # float32, as officially
            cn = cn.to_empty(device="cpu").eval().requires_grad_(False)
            enc = lambda x: pixel_feature_groups(phi, cn, x, **ACTIVATION_KWARGS)
        fixed, shape = mem.now, (cfg.in_channels, cfg.input_size, cfg.input_size)
        batch = (torch.zeros(groups, dtype=torch.long), torch.full((groups,), 2.0),
                 torch.randn(groups, pos, *shape), torch.randn(groups, unc, *shape),
                 torch.randn(groups * gen, *shape),
                 torch.zeros(groups * gen, cfg.noise_coords, dtype=torch.long))
        # every pass holds the same, so two passes (the second with the first's gradients)
        # show the peak; the whole step's draw is allocated above
        run = min(groups, 2 * (micro or groups))
        batch = [t[:run] for t in batch[:4]] + [t[:run * gen] for t in batch[4:]]
        generator_step(net, net, enc if convnext else phi, batch, micro or groups,
                       amp=torch.autocast("cpu", torch.bfloat16), taus=taus, chunk_bytes=2 ** 28,
                       exact=exact,
                       drift_loss=field_fast.drift_loss if fast_loss else field.drift_loss)
        del batch, state
    return dict(peak=mem.peak, fixed=fixed, params=sum(p.numel() for p in params))


def estimate_mae(mae="latent_640", batch=1024, world=8, size=None):
    """Bytes at the peak of one --stage mae step on one of `world` GPUs under FSDP (train.py
    --fsdp), `batch` samples per GPU, bf16 autocast. The sharded state is counted, not run:
    fp32 weights, gradients, AdamW's two moments and the EMA, 20 bytes per parameter over the
    ranks, plus 3 copies of the largest block's fp32 weights (FSDP's gathered block, the next
    one prefetched, the block's gradient before its reduce-scatter). The activations are run
    on fake tensors with the weights outside the counter and frozen: the backward makes every
    activation's gradient (the input requires one) and autocast's bf16 weight copies are kept
    for it, as on a GPU, with no weight gradient. -> {"peak", "state", "params"} (bytes)."""
    cfg = MAEConfig(**MAE_models[mae])
    size = size or {4: 32, 3: 256, 1: 28}[cfg.in_channels]     # latents, pixels, MNIST
    with torch.device("meta"):
        model = MAEResNet(cfg)
    n = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in m.parameters()) for m in model.modules()
                if isinstance(m, (BasicBlock, UpBlock)))
    state = 20 * n // world + 3 * 4 * block
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu").train().requires_grad_(False)
        x = torch.randn(batch, cfg.in_channels, size, size, requires_grad=True)
        with PeakBytes() as mem, CudaFloat32Ops():
            with torch.autocast("cpu", torch.bfloat16):
                loss, _ = model(x, torch.zeros(batch, dtype=torch.long), 0.0)
            loss.backward()
    return dict(peak=state + mem.peak, state=state, params=n)


def largest(n, fits):
    """The largest N in 1..n for which fits(N) holds, fits being true up to some N and false
    above it; by bisection (about log2(n) calls). 1 when nothing fits (the run then fails on
    its first step, with the out-of-memory error)."""
    lo, hi = 1, n                                   # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(micro, n, device, try_step, group=None):
    """--micro-groups -> (class groups per pass on this rank, the probed peak in bytes or
    None): a number is taken (at most n); by default all n in one pass; auto on a CPU: all n;
    auto on CUDA: the most groups per pass whose step (try_step(N): a forward and backward of
    this step's draw, nothing updated) peaks within 90% of the GPU's memory (the rest: CUDA's
    context, workspaces, fragmentation); the smallest over the ranks of `group` (a CPU
    process group), so that every rank makes the same passes."""
    if micro != "auto" or device.type != "cuda":
        return (min(micro, n) if isinstance(micro, int) else n), None
    budget, peak = 0.9 * torch.cuda.get_device_properties(device).total_memory, {}

    def fits(m):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            try_step(m)
        except torch.OutOfMemoryError:
            return False
        peak[m] = torch.cuda.max_memory_allocated(device)
        return peak[m] <= budget

    agreed = torch.tensor([largest(n, fits)])
    torch.cuda.empty_cache()
    if group is not None:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(agreed), peak.get(int(agreed))


def recipe_numbers(model, world=8):
    """A recipe's per-GPU step on `world` GPUs: (class groups, N_neg, N_pos, N_unc, MAE,
    ConvNeXt)."""
    r = RECIPES[model]
    return (r["n_classes_per_step"] // world, r["gen_per_label"], r["n_pos"], r["n_unc"],
            "pixel_640" if r["data"] == "images" else "latent_640",
            "base" if r["data"] == "images" else None)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["L2", "B2", "L16"])
    p.add_argument("--mae-batch", type=int, nargs="*", default=[],
                   help="also the MAE stage (latent_640, FSDP) at these samples per GPU")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    if args.models:
        print("| recipe | groups/GPU | micro | checkpointing | MAE dtype | fixed GiB | peak GiB |")
        print("|---|---|---|---|---|---|---|")
    for model in args.models:
        groups, gen, pos, unc, mae, cn = recipe_numbers(model, args.gpus)
        rows = [(None, False, False)] + [(m, True, True) for m in args.micro]
        for micro, remat, bf16 in rows:
            e = estimate(model, groups, micro, gen, pos, unc, mae, cn, remat, bf16)
            print(f"| {model} | {groups} | {micro or groups} | {remat} | "
                  f"{'bf16' if bf16 else 'fp32'} | {e['fixed'] / GiB:.1f} | "
                  f"{e['peak'] / GiB:.1f} |", flush=True)
    if args.mae_batch:
        print(f"\n| MAE latent_640, FSDP over {args.gpus} GPUs: samples per pass | state GiB "
              f"(sharded, + gathered blocks) | peak GiB |\n|---|---|---|")
    for batch in args.mae_batch:
        e = estimate_mae("latent_640", batch, args.gpus)
        print(f"| {batch} | {e['state'] / GiB:.1f} | {e['peak'] / GiB:.1f} |", flush=True)
