"""
Benchmarks, printed as Markdown tables with the command line and the machine in the header.

  python bench.py                 # everything below (about 8 minutes on a 2-core CPU)
  python bench.py --only loss     # drift loss value+grad vs its matmul floor
  python bench.py --only memory   # peak memory of drift_loss, whole vs chunked (subprocesses)
  python bench.py --only models   # generator forward+backward of the tiny presets
  python bench.py --only train    # one train.py --stage gen step of the tiny CPU presets
  python bench.py --only sample   # sample.py one-step sampling, samples/s of the tiny presets
  python bench.py --only gpu --out gpu.md   # B2, L2 at the paper's per-GPU batch on one GPU
  python bench.py --threads 1     # one torch thread (a machine shared with other jobs)
  python bench.py --baseline old_field.py   # + another field.py's drift_loss in loss and train

The loss and train tables time the reference (field.py) and the fast path (field_fast.py).

The matmul floor is what the drift loss cannot avoid: the distances as one batched matmul and
the forces as one more (the three temperatures stacked), timed in the same run on the same
tensors, once whole and once in the row chunks drift_loss works in.
Timings are medians; the functions of a table run in turns, so compare ratios, not times,
across runs on a shared machine.
"""
import argparse
import copy
import datetime
import importlib.util
import os
import platform
import random
import subprocess
import sys
import time

import torch

import field
import field_fast
from field import drift_loss
from metrics import PEAK_BF16, step_flops

LOSS_SHAPES = [(64, 64, 64, 16, 256), (256, 64, 64, 16, 64), (1024, 64, 64, 16, 32),
               (16, 64, 128, 32, 640)]                               # (rows, C_g, C_p, C_n, S)
MEMORY_SHAPE = dict(C_g=64, C_p=64, C_n=16, S=256)                  # 144 targets per row
TAUS = (0.02, 0.05, 0.2)


def chunk_rows(C_g, M, T=len(TAUS)):
    """drift_loss's default rows per chunk (about 4 MB per (rows, T, C_g, M) tensor)."""
    return max(1, 2 ** 20 // (T * C_g * M))


def timeit(fn, repeat=7, warmup=2):
    """Median wall time of fn() in seconds."""
    return in_turns(lambda k, s: fn(), ["fn"], repeat, warmup)["fn"]


def in_turns(step, keys, repeat=7, warmup=2, shuffle=False):
    """Median wall times (s) of step(key, s) for each key, run in turns (in a shuffled order
    per round with shuffle), so that a change in the load of a shared machine hits all of
    them alike and their ratios stay meaningful. s: the round, 0 in the warm-up."""
    for k in keys:
        for _ in range(warmup):
            step(k, 0)
    times = {k: [] for k in keys}
    for s in range(repeat):
        for k in random.Random(s).sample(list(keys), len(keys)) if shuffle else keys:
            t0 = time.perf_counter()
            step(k, s)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(t)[len(t) // 2] for k, t in times.items()}


def inputs(rows, C_g, C_p, C_n, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(rows, C_g, S, generator=g)
    pos, neg = torch.randn(rows, C_p, S, generator=g) + 0.5, torch.randn(rows, C_n, S, generator=g)
    return gen, pos, neg, torch.rand(rows, C_n, generator=g) * 3


def loss_fns(baseline=None):
    """The drift losses to compare: the reference, the fast path, and optionally the drift_loss
    of another field.py (e.g. an older commit's: `git show REV:field.py > old_field.py`)."""
    fns = {"reference": field.drift_loss, "fast": field_fast.drift_loss}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_field", baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fns["baseline"] = module.drift_loss
    return fns


def bench_loss(baseline=None):
    fns = loss_fns(baseline)
    print("\n### drift_loss value + gradient (ms, median of 11, all run in turns)\n")
    extra = " | baseline | reference / baseline | fast / baseline" if baseline else ""
    print(f"| rows, C_g, C_p, C_n, S | matmul floor | floor in row chunks | reference | fast | "
          f"reference / floor | fast / floor{extra} |")
    print("|---" * (7 + 3 * bool(baseline)) + "|")
    for shape in LOSS_SHAPES:
        gen, pos, neg, w_neg = inputs(*shape)
        rows, C_g, C_p, C_n, S = shape
        y = torch.cat([gen, neg, pos], dim=1)                        # (rows, M, S)
        A = torch.rand(rows, len(TAUS) * C_g, y.shape[1])           # stacked taus
        chunk = chunk_rows(C_g, y.shape[1])                          # drift_loss's chunks
        x = gen.clone().requires_grad_(True)

        def floor_chunked():
            for i in range(0, rows, chunk):
                torch.bmm(gen[i:i + chunk], y[i:i + chunk].mT)
                torch.bmm(A[i:i + chunk], y[i:i + chunk])

        def run(loss_fn):
            def f():
                x.grad = None
                loss_fn(x, pos, neg, w_neg=w_neg)[0].sum().backward()
            return f

        fs = {"floor": lambda: (torch.bmm(gen, y.mT), torch.bmm(A, y)),
              "chunked": floor_chunked, **{k: run(f) for k, f in fns.items()}}
        t = in_turns(lambda k, s: fs[k](), fs, repeat=11)
        line = (f"| {shape} | {t['floor'] * 1e3:.1f} | {t['chunked'] * 1e3:.1f} | "
                f"{t['reference'] * 1e3:.1f} | {t['fast'] * 1e3:.1f} | "
                f"{t['reference'] / t['floor']:.2f} | {t['fast'] / t['floor']:.2f}")
        if baseline:
            line += (f" | {t['baseline'] * 1e3:.1f} | {t['reference'] / t['baseline']:.2f} | "
                     f"{t['fast'] / t['baseline']:.2f}")
        print(line + " |")


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(mode, rows):
    """Run once in a fresh process; print the peak RSS above the inputs, in bytes."""
    torch.manual_seed(0)
    s = MEMORY_SHAPE
    gen = torch.empty(rows, s["C_g"], s["S"]).normal_().requires_grad_(True)
    pos = torch.empty(rows, s["C_p"], s["S"]).normal_()
    neg = torch.empty(rows, s["C_n"], s["S"]).normal_()
    w_neg = torch.empty(rows, s["C_n"]).uniform_(0, 3)
    gen.grad = torch.zeros_like(gen)                                 # the gradient's memory
    base = _rss_kb("VmRSS:")                                         # counts as input
    budget = 2 ** 62 if mode == "whole" else 0
    chunk = rows if mode == "whole" else None
    loss, _ = drift_loss(gen, pos, neg, w_neg=w_neg, chunk_rows=chunk, memory_budget=budget)
    loss.sum().backward()
    print((_rss_kb("VmHWM:") - base) * 1024)


def bench_memory(rows_list=(2048, 8192), big=65536):
    """Peak memory above the inputs (gen, pos, neg and gen.grad), in fresh subprocesses."""
    def peak(mode, rows):
        # NOTE: glibc's dynamic mmap threshold keeps freed multi-MB chunks in the heap, so the
        # peak RSS of a loop over chunks counts memory no tensor holds; a fixed threshold makes
        # RSS follow the live tensors (both columns alike).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(rows),
                              "--threads", str(torch.get_num_threads())],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return None
        return int(out.stdout.strip().splitlines()[-1])

    s = MEMORY_SHAPE
    print(f"\n### drift_loss peak memory above its inputs (GB; C_g={s['C_g']}, "
          f"targets={s['C_g'] + s['C_p'] + s['C_n']}, S={s['S']})\n")
    print("| rows | whole (one chunk, keep all) | chunked (default chunks, budget 0) "
          "| chunked / whole |")
    print("|---|---|---|---|")
    per_row = None
    for rows in rows_list:
        p = {m: peak(m, rows) for m in ("whole", "chunked")}
        per_row = p["whole"] / rows
        print(f"| {rows} | {p['whole'] / 1e9:.2f} | {p['chunked'] / 1e9:.2f} | "
              f"{p['chunked'] / p['whole']:.3f} |")
    chunked_big = peak("chunked", big)
    est = per_row * big / 1e9
    measured = f"{chunked_big / 1e9:.2f}" if chunked_big else "(did not run)"
    ratio = f"{chunked_big / 1e9 / est:.3f}" if chunked_big else "-"
    print(f"| {big} | {est:.1f} (extrapolated) | {measured} (measured) | {ratio} |")
    print(f"\nAt {big} rows the whole computation does not fit in this machine's memory: its "
          f"figure is the per-row peak measured at {rows_list[-1]} rows times {big}.")


def bench_models():
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    print("\n### DriftDiT forward + backward, tiny presets (ms, median of 5)\n")
    print("| preset | params | batch | input | fwd+bwd ms | samples/s |")
    print("|---|---|---|---|---|---|")
    for name in TINY:                                                # paper sizes: GPU only
        cfg = DriftDiTConfig(**DriftDiT_models[name])
        model, B = DriftDiT(cfg), 64
        noise = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
        labels, alpha = torch.randint(0, cfg.num_classes, (B,)), torch.ones(B)
        t = timeit(lambda: model(noise, labels, alpha).square().mean().backward(), 5, 1)
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n / 1e6:.2f}M | {B} | {cfg.in_channels}x{cfg.input_size}x"
              f"{cfg.input_size} | {t * 1e3:.0f} | {B / t:.0f} |")


# the presets' feature encoders: the recipes' MAE on GPUs, one CPU size for the tiny ones
# (train.py --stage mae makes them); S8 also has ConvNeXt, as the pixel recipes
ENCODER = {"S2": "tiny", "S4": "mnist", "S8": "pixel_tiny", "B2": "latent_640",
           "L2": "latent_640"}
TINY = ["S2", "S4", "S8"]


def setup(name, device="cpu"):
    """A preset's recipe (config.RECIPES sizes), its generator and frozen random feature
    encoder(s), initialized on `device` (no CPU copy of the paper sizes), and a sampler over
    random data (64 samples of each of the step's classes), its EMA and AdamW -> (args, cfg,
    model, ema, opt, mae, phi, sampler); phi: the MAE, or for S8 x -> MAE + ConvNeXt groups."""
    from config import parse_args
    from convnext import ConvNeXt_models, ConvNeXtV2, pixel_feature_groups
    from data import TensorSampler
    from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    args = parse_args(["--model", name, "--data-path", "unused"])   # the recipe's sizes
    torch.manual_seed(0)
    cfg = DriftDiTConfig(**DriftDiT_models[name])
    with torch.device(device):
        model = DriftDiT(cfg)
        mae = MAEResNet(MAEConfig(**MAE_models[ENCODER[name]]), with_heads=False)
    phi = mae.eval().requires_grad_(False)
    if name == "S8":
        convnext = ConvNeXtV2(**ConvNeXt_models["tiny"]).eval().requires_grad_(False)
        phi = lambda x: pixel_feature_groups(mae, convnext, x, **ACTIVATION_KWARGS)
    K = args.n_classes_per_step
    images = torch.randn(K * 64, cfg.in_channels, cfg.input_size, cfg.input_size).clamp(-1, 1)
    sampler = TensorSampler(images, torch.arange(K * 64) % K, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay,
                            fused=torch.device(device).type == "cuda")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return args, cfg, model, ema, opt, mae, phi, sampler


def bench_train(baseline=None, repeat=15):
    """One generator step as train.py's loop runs it (draw_groups, generator_loss: DriftDiT
    forward, feature groups, drift_loss per group; backward, clip, AdamW, EMA), with each
    drift loss, in shuffled turns: a change in the load of the machine hits all alike."""
    from step import generator_loss
    from config import draw_numbers
    from data import draw_groups
    from models import update_ema
    fns = loss_fns(baseline)
    print(f"\n### One `train.py --stage gen` step, tiny CPU presets (ms, median of {repeat})\n")
    print("| preset | groups x (gen, pos, unc) | feature groups | drift-loss rows | "
          + " | ".join(f"step, {k}" for k in fns) + " | fast / reference"
          + (" | reference / baseline | fast / baseline" if baseline else "")
          + " | samples/s (fast) |")
    print("|---" * (6 + len(fns) + 2 * bool(baseline)) + "|")
    for name in TINY:
        args, cfg, model, ema, opt, _, phi, sampler = setup(name)
        groups, calls = range(args.n_classes_per_step), []

        def step(k, s):                                              # the loop's body
            def counted(gen, *a, **kw):
                calls.append(gen.shape[0])
                return fns[k](gen, *a, **kw)
            calls.clear()
            batch = draw_groups(sampler, cfg, s, groups, **draw_numbers(args))
            loss, _, _ = generator_loss(model, phi, *batch, taus=args.taus,
                                              drift_loss=counted)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            update_ema(ema, model, args.ema)

        t = in_turns(step, list(fns), repeat, warmup=1, shuffle=True)
        line = (f"| {name} | {args.n_classes_per_step} x ({args.gen_per_label}, {args.n_pos}, "
                f"{args.n_unc}) | {len(calls)} | {sum(calls)} | "
                + " | ".join(f"{t[k] * 1e3:.0f}" for k in fns)
                + f" | {t['fast'] / t['reference']:.3f}")
        if baseline:
            line += (f" | {t['reference'] / t['baseline']:.3f} | "
                     f"{t['fast'] / t['baseline']:.3f}")
        print(line + f" | {args.n_classes_per_step * args.gen_per_label / t['fast']:.0f} |")


def bench_cache(repeat=9):
    """train.py --cache-features: one S4 step (fast loss) with the real samples' feature
    groups computed every step vs gathered from the cache (same numbers, tested), in
    shuffled turns, for several N_pos; a random MNIST-size MAE (speed does not depend on it)."""
    from step import generator_loss
    from cache import embed_all
    from config import draw_numbers
    from data import TensorSampler, draw_groups
    args, cfg, model, _, opt, _, phi, sampler = setup("S4")
    cache = embed_all(phi, sampler.images)
    index = TensorSampler(torch.arange(len(sampler.labels)), sampler.labels, args.seed)
    print(f"\n### `train.py --cache-features`: one S4 step, ms (median of {repeat}, in turns)\n")
    print("| groups x (gen, pos, unc) | real features per step | cached | cached / per step |")
    print("|---|---|---|---|")
    for n_pos in (8, 16, 32):
        a = argparse.Namespace(**{**vars(args), "gen_per_label": 8, "n_pos": n_pos})

        def step(cached, s):                                         # the loop's body
            batch = draw_groups(index if cached else sampler, cfg, s, range(10),
                                **draw_numbers(a))
            loss, _, _ = generator_loss(model, phi, *batch, taus=a.taus,
                                              drift_loss=field_fast.drift_loss,
                                              cached=cache if cached else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        m = {c: t * 1e3 for c, t in in_turns(step, [False, True], repeat, 1, True).items()}
        print(f"| 10 x (8, {n_pos}, 4) | {m[False]:.0f} | {m[True]:.0f} | "
              f"{m[True] / m[False]:.2f} |")


def bench_sample(batch=64):
    """sample.py's one-step sampling (generate + decode to uint8) of the tiny presets, random
    weights: the speed does not depend on them. S2 makes latents: its figure excludes the SD-VAE
    decoder (no weights here), which costs far more than the generator."""
    import sample
    print(f"\n### `sample.py` one-step sampling, batch {batch} (median of 5)\n")
    print("| preset | output | ms per batch | samples/s |")
    print("|---|---|---|---|")
    for name in TINY:
        args, cfg, model, _, _, _, phi, sampler = setup(name)
        model.eval()
        labels = torch.arange(batch) % cfg.num_classes

        @torch.no_grad()
        def draw():
            x = sample.generate(model, list(range(batch)), labels, 1.0, 0, "cpu")
            return x if cfg.out_channels == sample.LATENT_CHANNELS else sample.decode(x)

        t = timeit(draw, repeat=5, warmup=1)
        kind = "latents (no VAE)" if cfg.out_channels == sample.LATENT_CHANNELS else "uint8"
        print(f"| {name} | {cfg.out_channels}x{cfg.input_size}x{cfg.input_size} {kind} | "
              f"{t * 1e3:.0f} | {batch / t:.0f} |")


# ------------------------------------------------------------------------------------------
# The GPU table: the paper-size train step on one device (`--only gpu`; tiny presets on a CPU)
# ------------------------------------------------------------------------------------------
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


def gpu_row(preset, device, steps, compile_check):
    """One preset: the paper's per-GPU share (groups / 8), halved until it fits; `steps` warm
    steps of train.py's loop body timed by phase -> the table's row."""
    from step import generator_loss
    from config import draw_numbers
    from data import draw_groups
    from encoder import ACTIVATION_KWARGS, feature_groups
    from models import update_ema
    args, cfg, model, ema, opt, mae, _, sampler = setup(preset, device)
    cuda, n_groups = device.type == "cuda", max(1, args.n_classes_per_step // 8)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    spans, timed, seconds = phase_timer(cuda)
    gen = timed("gen fwd", model)
    phi = timed("encoder fwd", lambda x: feature_groups(mae, x, **ACTIVATION_KWARGS))
    loss_fn = timed("drift loss", field.drift_loss)

    def optimize():
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, args.ema)

    def step(s, groups):                        # train.py's loop body, timed by phase
        spans.clear()
        batch = [x.to(device) for x in draw_groups(sampler, cfg, s, range(groups),
                                                         **draw_numbers(args))]

        def body():
            with amp:
                loss = generator_loss(gen, phi, *batch, taus=args.taus,
                                            drift_loss=loss_fn)[0]
            timed("backward", loss.backward)()
            timed("optimizer", optimize)()
        timed("step", body)()
        if cuda:
            torch.cuda.synchronize(device)
        return seconds()

    while True:                                 # the per-GPU share, halved until it fits
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            step(0, n_groups)
            runs = [step(s + 1, n_groups) for s in range(steps)]
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            spans.clear()
            torch.cuda.empty_cache()
            if n_groups == 1:
                raise
            n_groups //= 2
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    n_gen, n_real = n_groups * args.gen_per_label, n_groups * (args.n_pos + args.n_unc)
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = step_flops(cfg, mae.cfg, n_gen, n_real) / med["step"] / peak if peak else None
    mem = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if cuda else "n/a"
    share = lambda k: f"{100 * med.get(k, 0) / med['step']:.0f}%"
    eager, compiled = sdpa_kernels(model, cfg, device, amp, compile_check)
    return (f"| {preset} | {ENCODER[preset]} | {n_groups} x ({args.gen_per_label}, "
            f"{args.n_pos}, {args.n_unc}) | {med['step']:.3f} | {n_gen / med['step']:.0f} | "
            f"{mem} | " + (f"{100 * mfu:.1f}%" if mfu else "n/a") + " | "
            + " | ".join(share(k) for k in ("gen fwd", "encoder fwd", "drift loss", "backward",
                                            "optimizer")) + f" | {eager} | {compiled} |")


def bench_gpu(device, presets, steps=3, compile_check=True, out=None):
    """Per preset a row of gpu_row (step time, img/s, peak memory, MFU from step_flops, phase
    shares, the SDPA kernel eager and compiled), then a 1-process torchrun step of train.py.
    Random weights and data: nothing to download."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    lines = [f"### Train step on one {name} ({'bf16 autocast' if cuda else 'fp32, CPU'}, "
             f"random weights, median of {steps} warm steps)\n",
             "| preset | MAE | groups x (gen, pos, unc) | step s | gen img/s | peak GB | MFU "
             "| gen fwd | encoder fwd | drift loss | backward | optimizer | SDPA | SDPA, "
             "compiled |", "|---" * 14 + "|"]
    print("\n".join(lines))
    for preset in presets:
        lines.append(gpu_row(preset, device, steps, compile_check))
        print(lines[-1], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    lines.append("\nMFU: step_flops (bench.py) over the step time and the GPU's dense bf16 "
                 "peak; the phase shares are of the step time (encoder fwd: real and generated "
                 "features; backward: generator and encoder together).")
    lines.append(torchrun_smoke(device))
    print(lines[-1])
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def torchrun_smoke(device):
    """A 2-step `torchrun --nproc_per_node=1 train.py --model S4` (NCCL on a GPU, gloo on a
    CPU) on MNIST-5k with a random tiny MAE: the DDP path starts, steps and checkpoints."""
    import tempfile
    from encoder import MAEConfig, MAE_models, MAEResNet
    from checkpoint import save_checkpoint
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        mae = os.path.join(d, "mae.safetensors")
        save_checkpoint(MAEResNet(MAEConfig(**MAE_models["mnist"]), with_heads=False), mae,
                        kind="mae")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", "train.py", "--model", "S4", "--mae-ckpt", mae, "--out",
               os.path.join(d, "run"), "--steps", "2", "--log-every", "1", "--device",
               device.type, "--eval-every", "0"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=300)
        ok = res.returncode == 0 and os.path.exists(os.path.join(d, "run", "model.safetensors"))
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return (f"\n1-process torchrun ({backend}) of `train.py --model S4`, 2 steps + checkpoint: "
            + (f"ok in {time.perf_counter() - t0:.0f} s" if ok else
               f"FAILED (exit {res.returncode}): {res.stderr[-500:]}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loss", "memory", "models", "train", "sample", "gpu"],
                        help="one table only (gpu: not in the default set)")
    parser.add_argument("--device", default="cuda", help="gpu table: cuda, or cpu (tiny presets)")
    parser.add_argument("--presets", nargs="+", help="gpu table: DriftDiT presets "
                        "(default: B2 L2 on cuda, S2 on cpu)")
    parser.add_argument("--steps", type=int, default=3, help="gpu table: timed warm steps")
    parser.add_argument("--no-compile", action="store_true", help="gpu table: skip the "
                        "torch.compile SDPA check")
    parser.add_argument("--out", help="gpu table: also write it to this file")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default, one per core)")
    parser.add_argument("--baseline", help="another field.py whose drift_loss is timed beside "
                        "ours (loss and train tables), e.g. git show REV:field.py > old.py")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "ROWS"),
                        help=argparse.SUPPRESS)                      # internal
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        sys.exit(0)
    print(f"## `python {' '.join(sys.argv)}`\n")
    print(f"{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads | "
          f"torch {torch.__version__} | Python {platform.python_version()}")
    tables = dict(loss=[lambda: bench_loss(args.baseline)], memory=[bench_memory],
                  models=[bench_models], train=[lambda: bench_train(args.baseline), bench_cache],
                  sample=[bench_sample])
    for table in (fn for name, fns in tables.items() if args.only in (None, name) for fn in fns):
        table()
    if args.only == "gpu":
        bench_gpu(args.device, args.presets or (["B2", "L2"] if args.device == "cuda" else
                                                ["S2"]), args.steps, not args.no_compile,
                  args.out)
