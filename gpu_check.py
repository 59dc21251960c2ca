"""
The prepared GPU check: train.py's generator step (step.generator_step, as the loop runs it:
micro-batches with the step's statistics, activation checkpointing and the bf16 MAE of the
recipes) at each paper recipe's full per-GPU batch (128 class groups / 8 GPUs) on one GPU,
with --micro-groups auto's plan (memory.plan), timed by phase. Each row is printed and written
as soon as it is measured; an out-of-memory becomes a row. Random weights and data: nothing to
download. On a CPU it runs the tiny presets (the check of the check, in the tests).

    python bench.py --only gpu --out docs/gpu.md    # L2, B2, L16 on one GPU (run by bench.py)
"""
import copy
import itertools
import platform
import time

import torch

import field
from config import draw_numbers, parse_args
from convnext import ConvNeXt_models, ConvNeXtV2, pixel_feature_groups
from data import TensorSampler, draw_groups
from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet
from memory import GiB, estimate, plan
from metrics import PEAK_BF16, step_flops
from models import DriftDiT, DriftDiT_models, DriftDiTConfig, update_ema
from step import features, generator_step

# each preset's feature encoders: (MAE preset, ConvNeXt preset or None). The paper's MAE-640
# for the paper sizes; the tiny presets get CPU ones (S8 the pixel path with a tiny ConvNeXt)
ENCODER = {"S2": ("tiny", None), "S4": ("mnist", None), "S8": ("pixel_tiny", "tiny"),
           "B2": ("latent_640", None), "L2": ("latent_640", None),
           "B16": ("pixel_640", "base"), "L16": ("pixel_640", "base")}
TINY = ["S2", "S4", "S8"]


def setup(name, device="cpu"):
    """A preset's recipe (config.RECIPES: sizes, --grad-checkpoint), its generator and frozen
    random encoder(s), built on `device` (the MAE in bf16 on CUDA, as train.py holds it), a
    sampler over random data, its EMA and AdamW -> (args, cfg, model, ema, opt, mae, phi,
    sampler); phi: the MAE, or x -> MAE + ConvNeXt feature groups."""
    args = parse_args(["--model", name, "--data-path", "unused"])   # the recipe's sizes
    torch.manual_seed(0)
    device = torch.device(device)
    cfg = DriftDiTConfig(**{**DriftDiT_models[name], "grad_checkpoint": args.grad_checkpoint})
    mae_name, convnext = ENCODER[name]
    with torch.device(device):
        model = DriftDiT(cfg)
        mae = MAEResNet(MAEConfig(**MAE_models[mae_name]), with_heads=False)
    mae = mae.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    phi = mae.eval().requires_grad_(False)
    if convnext:                                # float32, as officially
        net = ConvNeXtV2(**ConvNeXt_models[convnext]).to(device).eval().requires_grad_(False)
        phi = lambda x: pixel_feature_groups(mae, net, x, **ACTIVATION_KWARGS)
    K, per_class = args.n_classes_per_step, 64 if cfg.input_size <= 64 else 8
    images = torch.randn(K * per_class, cfg.in_channels, cfg.input_size, cfg.input_size)
    sampler = TensorSampler(images.clamp(-1, 1), torch.arange(K * per_class) % K, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return args, cfg, model, ema, opt, mae, phi, sampler


def sdpa_op(fn):
    """The aten scaled_dot_product_attention kernel `fn()` dispatches to (profiler op names:
    ..._flash_attention, ..._efficient_attention, ..._cudnn_attention, ..._attention_math)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot")}
    return ", ".join(sorted(n[len("aten::_scaled_dot_product_"):] for n in names)) or "none"


def phase_timer(cuda):
    """-> (spans {phase: [(start, end)]}, timed(phase, fn): fn recording its span, seconds:
    spans -> {phase: s}); CUDA events on a GPU (no sync inside the step), perf_counter else."""
    spans = {}

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def timed(phase, fn):
        def run(*a, **kw):
            start, y = mark(), fn(*a, **kw)
            spans.setdefault(phase, []).append((start, mark()))
            return y
        return run
    span = lambda a, b: a.elapsed_time(b) / 1e3 if cuda else b - a
    return spans, timed, lambda: {k: sum(span(a, b) for a, b in v) for k, v in spans.items()}


def sdpa_kernels(model, cfg, device, amp, compile_check):
    """The SDPA kernel of a forward, eager and under torch.compile (or why not)."""
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)

    def forward(m):
        with torch.no_grad(), amp:
            m(x, torch.zeros(len(x), dtype=torch.long, device=device), 1.0)
    eager, compiled = sdpa_op(lambda: forward(model)), "skipped"
    if compile_check:
        t0 = time.perf_counter()
        try:
            fast = torch.compile(model)
            forward(fast)                       # the compile itself
            compiled = (f"{sdpa_op(lambda: forward(fast))} (compiled in "
                        f"{time.perf_counter() - t0:.0f} s)")
        except Exception as e:              # report, do not stop the table
            compiled = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return eager, compiled


def gpu_row(preset, device, steps, compile_check, with_estimate):
    """One preset at the recipe's per-GPU batch: the plan (memory.plan: auto on CUDA), one
    warm and `steps` timed steps of train.py's loop body by phase -> the table's row."""
    args, cfg, model, ema, opt, mae, phi, sampler = setup(preset, device)
    cuda = device.type == "cuda"
    n = max(1, args.n_classes_per_step // 8)    # the per-GPU share of 8 GPUs
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    spans, timed, seconds = phase_timer(cuda)
    gen, enc = timed("gen fwd", model), timed("encoder fwd", lambda x: features(phi, x))
    kw = dict(amp=amp, taus=args.taus, drift_loss=timed("drift loss", field.drift_loss))
    draw = lambda s: [x.to(device) for x in draw_groups(sampler, cfg, s, range(n),
                                                        **draw_numbers(args))]
    sizes = f"{n} x ({args.gen_per_label}, {args.n_pos}, {args.n_unc})"
    name = f"{preset} | {' + '.join(e for e in ENCODER[preset] if e)} | {sizes}"
    try:
        micro, probed = plan("auto" if cuda else None, n, device, lambda m: (
            generator_step(model, model, phi, draw(0), m, **kw), model.zero_grad()), None)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def step(s):                            # train.py's loop body, timed by phase
            spans.clear()
            batch = draw(s)
            timed("step", lambda: (generator_step(gen, gen, enc, batch, micro, **kw),
                                   torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip),
                                   timed("optimizer", opt.step)(), opt.zero_grad(),
                                   update_ema(ema, model, args.ema)))()
            torch.cuda.synchronize(device) if cuda else None
            return seconds()
        step(0)
        runs = [step(s + 1) for s in range(steps)]
    except torch.OutOfMemoryError as e:             # a row, never a lost table
        return f"| {name} | OOM: {str(e).splitlines()[0][:80]} |"
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    n_gen, n_real = n * args.gen_per_label, n * (args.n_pos + args.n_unc)
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)),
                None) if cuda else None
    mfu = step_flops(cfg, mae.cfg, n_gen, n_real) / med["step"] / peak if peak else None
    mem = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if cuda else "n/a"
    est = "-" if not with_estimate else "{:.1f}".format(estimate(
        preset, n, micro, args.gen_per_label, args.n_pos, args.n_unc, *ENCODER[preset],
        args.grad_checkpoint, mae_bf16=cuda)["peak"] / GiB)
    share = {k: f"{100 * med.get(k, 0) / med['step']:.0f}%" for k in med}
    rest = 1 - sum(med.get(k, 0) for k in ("gen fwd", "encoder fwd", "drift loss",
                                            "optimizer")) / med["step"]
    eager, compiled = sdpa_kernels(model, cfg, device, amp, compile_check)
    return (f"| {name} | {micro} x {-(-n // micro)}{', remat' if cfg.grad_checkpoint else ''} "
            f"| {med['step']:.3f} | {n_gen / med['step']:.0f} | {mem} | {est} | "
            + (f"{100 * mfu:.1f}%" if mfu else "n/a") + " | "
            + " | ".join(share.get(k, "0%") for k in ("gen fwd", "encoder fwd", "drift loss",
                                                      "optimizer"))
            + f" | {100 * rest:.0f}% | {eager} | {compiled} |")


def bench_gpu(device, presets, steps=2, compile_check=True, out=None, with_estimate=False):
    """A row of gpu_row per preset, each printed and appended to `out` when measured."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    lines = [f"### Train step on one {name} ({'bf16 autocast' if cuda else 'fp32, CPU'}, "
             f"random weights, median of {steps} warm steps)\n",
             "| preset | encoders | groups x (gen, pos, unc) | per pass x passes | step s | "
             "gen img/s | peak GB | estimate GiB | MFU | gen fwd | encoder fwd | drift loss | "
             "optimizer | backward, rest | SDPA | SDPA, compiled |", "|---" * 16 + "|"]
    rows = (gpu_row(p, device, steps, compile_check, with_estimate) for p in presets)
    for line in itertools.chain(lines, rows):   # each row printed and kept when measured
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                print(line, file=f)
        if cuda:
            torch.cuda.empty_cache()
    note = ("\nMFU: step_flops (metrics.py: the model's useful FLOPs, no recompute) over the "
            "step time and the GPU's dense bf16 peak; the shares are of the step time (gen fwd "
            "and encoder fwd include the statistics sweeps and the recompute of checkpointing).")
    print(note)
    if out:
        with open(out, "a") as f:
            print(note, file=f)
