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
import math
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

LOSS_SHAPES = [(64, 64, 64, 16, 256), (256, 64, 64, 16, 64), (1024, 64, 64, 16, 32),
               (16, 64, 128, 32, 640)]                               # (rows, C_g, C_p, C_n, S)
MEMORY_SHAPE = dict(C_g=64, C_p=64, C_n=16, S=256)                  # 144 targets per row
TAUS = (0.02, 0.05, 0.2)


def chunk_rows(C_g, M, T=len(TAUS)):
    """drift_loss's default rows per chunk (about 4 MB per (rows, T, C_g, M) tensor)."""
    return max(1, 2 ** 20 // (T * C_g * M))


def timeit(fn, repeat=7, warmup=2):
    """Median wall time of fn() in seconds."""
    return timeit_all({"fn": fn}, repeat, warmup)["fn"]


def timeit_all(fns, repeat=7, warmup=2):
    """Median wall times (s) of several functions, run in turns, so that a change in the load
    of a shared machine hits all of them alike and their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


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
    print(f"\n### drift_loss value + gradient (ms, median of 11, all run in turns)\n")
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

        t = timeit_all({"floor": lambda: (torch.bmm(gen, y.mT), torch.bmm(A, y)),
                        "chunked": floor_chunked, **{k: run(f) for k, f in fns.items()}},
                       repeat=11)
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
    try:
        from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    except ImportError:
        print("\n(models.py has no DriftDiT yet)")
        return
    print("\n### DriftDiT forward + backward, tiny presets (ms, median of 5)\n")
    print("| preset | params | batch | input | fwd+bwd ms | samples/s |")
    print("|---|---|---|---|---|---|")
    for name, preset in DriftDiT_models.items():
        cfg = DriftDiTConfig(**preset)
        if cfg.hidden_size > 512:                                    # paper sizes: GPU only
            continue
        model, B = DriftDiT(cfg), 64
        noise = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
        labels = torch.randint(0, cfg.num_classes, (B,))
        alpha = torch.ones(B)

        def step():
            model(noise, labels, alpha).square().mean().backward()

        t = timeit(step, repeat=5, warmup=1)
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n / 1e6:.2f}M | {B} | {cfg.in_channels}x{cfg.input_size}x"
              f"{cfg.input_size} | {t * 1e3:.0f} | {B / t:.0f} |")


# tiny CPU presets -> the MAE preset their feature encoder has (train.py --stage mae makes it)
TINY_MAE = {"S2": "tiny", "S4": "mnist", "S8": "pixel_tiny"}


def tiny_setup(name):
    """A tiny preset's generator, frozen random feature encoder(s) (S8: MAE + ConvNeXt, as the
    pixel recipes) and a sampler over random data, with the preset's train.RECIPES sizes."""
    import train
    from data import TensorSampler
    from convnext import ConvNeXt_models, ConvNeXtV2, pixel_feature_groups
    from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    args = train.parse_args(["--model", name, "--data-path", "unused"])   # the recipe's sizes
    torch.manual_seed(0)
    cfg = DriftDiTConfig(**DriftDiT_models[name])
    model = DriftDiT(cfg)
    mae = MAEResNet(MAEConfig(**MAE_models[TINY_MAE[name]]), with_heads=False)
    phi = mae.eval().requires_grad_(False)
    if name == "S8":
        convnext = ConvNeXtV2(**ConvNeXt_models["tiny"]).eval().requires_grad_(False)
        phi = lambda x: pixel_feature_groups(mae, convnext, x, **ACTIVATION_KWARGS)
    K = args.n_classes_per_step
    images = torch.randn(K * 64, cfg.in_channels, cfg.input_size, cfg.input_size).clamp(-1, 1)
    sampler = TensorSampler(images, torch.arange(K * 64) % K, args.seed)
    return args, cfg, model, phi, sampler


def bench_train(baseline=None, repeat=15):
    """One generator step as train.py's loop runs it (draw_groups, generator_loss: DriftDiT
    forward, feature groups, drift_loss per group; backward, clip, AdamW, EMA), with each
    drift loss, in shuffled turns: a change in the load of the machine hits all alike."""
    import train
    from data import draw_groups
    from models import update_ema
    fns = loss_fns(baseline)
    print(f"\n### One `train.py --stage gen` step, tiny CPU presets (ms, median of {repeat})\n")
    print("| preset | groups x (gen, pos, unc) | feature groups | drift-loss rows | "
          + " | ".join(f"step, {k}" for k in fns) + " | fast / reference"
          + (" | reference / baseline | fast / baseline" if baseline else "")
          + " | samples/s (fast) |")
    print("|---" * (6 + len(fns) + 2 * bool(baseline)) + "|")
    for name in TINY_MAE:
        args, cfg, model, phi, sampler = tiny_setup(name)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                weight_decay=args.weight_decay)
        groups, calls = range(args.n_classes_per_step), []

        def step(fn, s):                                             # the loop's body
            def counted(gen, *a, **kw):
                calls.append(gen.shape[0])
                return fn(gen, *a, **kw)
            calls.clear()
            t0 = time.perf_counter()
            batch = draw_groups(sampler, cfg, args, s, groups)
            loss, _, _ = train.generator_loss(model, phi, *batch, taus=args.taus,
                                              drift_loss=counted)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            update_ema(ema, model, args.ema)
            return time.perf_counter() - t0

        for fn in fns.values():                                      # warm-up
            step(fn, 0)
        times, order = {k: [] for k in fns}, list(fns)
        for s in range(repeat):
            random.Random(s).shuffle(order)
            for k in order:
                times[k].append(step(fns[k], s))
        t = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
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
    import train
    from data import TensorSampler, draw_groups
    import field_fast
    args, cfg, model, phi, sampler = tiny_setup("S4")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cache = train.embed_all(phi, sampler.images)
    index = TensorSampler(torch.arange(len(sampler.labels)), sampler.labels, args.seed)
    print(f"\n### `train.py --cache-features`: one S4 step, ms (median of {repeat}, in turns)\n")
    print("| groups x (gen, pos, unc) | real features per step | cached | cached / per step |")
    print("|---|---|---|---|")
    for n_pos in (8, 16, 32):
        a = argparse.Namespace(**{**vars(args), "gen_per_label": 8, "n_pos": n_pos})

        def step(cached, s):                                         # the loop's body
            t0 = time.perf_counter()
            batch = draw_groups(index if cached else sampler, cfg, a, s, range(10))
            loss, _, _ = train.generator_loss(model, phi, *batch, taus=a.taus,
                                              drift_loss=field_fast.drift_loss,
                                              cached=cache if cached else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0
        step(False, 0), step(True, 0)                                # warm-up
        t = {False: [], True: []}
        for s in range(repeat):
            for c in random.Random(s).sample([False, True], 2):
                t[c].append(step(c, s))
        m = {c: sorted(v)[len(v) // 2] * 1e3 for c, v in t.items()}
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
    for name in TINY_MAE:
        args, cfg, model, phi, sampler = tiny_setup(name)
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
GPU_MAE = {"B2": "latent_640", "L2": "latent_640", "S2": "tiny"}   # the recipes' encoders
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def dit_flops(cfg):
    """Forward matmul FLOPs of DriftDiT per sample (2 per multiply-add; norms, RoPE, adds not
    counted). T = (H/p)^2 patch tokens, N = K + T tokens, H_m the SwiGLU width, L blocks:
      2 [T p^2 C_in D  (x_embed)  +  Dc D (cls_proj)  +  256 Dc + Dc^2 (alpha MLP)
         + L (6 Dc D (adaLN) + 4 N D^2 (qkv, proj) + 2 N^2 D (QK^T, AV) + 3 N D H_m (SwiGLU))
         + 2 Dc D + N D p^2 C_out  (final adaLN and linear, on all N tokens)]"""
    D, Dc, p, L = cfg.hidden_size, cfg.cond_dim, cfg.patch_size, cfg.depth
    T = (cfg.input_size // p) ** 2
    N, Hm = cfg.n_cls_tokens + T, (int(2 / 3 * int(D * cfg.mlp_ratio)) + 31) // 32 * 32
    return 2 * (T * p * p * cfg.in_channels * D + Dc * D + 256 * Dc + Dc * Dc
                + L * (6 * Dc * D + 4 * N * D * D + 2 * N * N * D + 3 * N * D * Hm)
                + 2 * Dc * D + N * D * p * p * cfg.out_channels)


def mae_flops(cfg, size):
    """Forward conv FLOPs of the MAE encoder per sample on a size x size input (before input
    patching). C = p^2 C_img channels on an h = size/p grid; stage i has width D_i = C_0 2^i on
    h_i = ceil(h_{i-1} / 2) (h_0 = h), its first block strides 2 for i > 0:
      2 [9 C C_0 h^2  (stem)  +  sum_i (9 D_in D_i h_i^2 + 9 D_i^2 h_i^2 (first block)
         + [i > 0] D_{i-1} D_i h_i^2 (1x1 projection) + (n_i - 1) 18 D_i^2 h_i^2)]"""
    h, c = size // cfg.input_patch_size, cfg.in_channels * cfg.input_patch_size ** 2
    total, d_in = 9 * c * cfg.base_channels * h * h, cfg.base_channels
    for i, n in enumerate(cfg.layers):
        d = cfg.base_channels * 2 ** i
        h = (h - 1) // 2 + 1 if i > 0 else h
        total += 9 * d_in * d * h * h + 9 * d * d * h * h + (d_in * d * h * h if i > 0 else 0)
        total += (n - 1) * 18 * d * d * h * h
        d_in = d
    return 2 * total


def step_flops(cfg, mae_cfg, n_gen, n_real):
    """Model FLOPs of one generator step: generator forward + backward (3x its forward), the
    encoder on the generated samples forward + input-gradient backward (2x: frozen weights),
    on the real ones forward only. The drift loss's matmuls are left out (timed apart)."""
    return 3 * n_gen * dit_flops(cfg) + (2 * n_gen + n_real) * mae_flops(mae_cfg, cfg.input_size)


def sdpa_op(fn):
    """The aten scaled_dot_product_attention kernel `fn()` dispatches to (profiler op names:
    ..._flash_attention, ..._efficient_attention, ..._cudnn_attention, ..._attention_math)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot")}
    return ", ".join(sorted(n[len("aten::_scaled_dot_product_"):] for n in names)) or "none"


def bench_gpu(device, presets, steps=3, compile_check=True, out=None):
    """Per preset: the paper's per-GPU share (groups / 8), halved until it fits; `steps` warm
    steps of train.py's loop body timed by phase (CUDA events; perf_counter on a CPU), peak
    memory, MFU from step_flops, the SDPA kernel (eager and torch.compile), then a 1-process
    torchrun step of train.py. Random weights and data: nothing to download."""
    import train
    from data import TensorSampler, draw_groups
    from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, feature_groups
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models, update_ema
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    lines = [f"### Train step on one {name} ({'bf16 autocast' if cuda else 'fp32, CPU'}, "
             f"random weights, median of {steps} warm steps)\n",
             "| preset | MAE | groups x (gen, pos, unc) | step s | gen img/s | peak GB | MFU "
             "| gen fwd | encoder fwd | drift loss | backward | optimizer | SDPA | SDPA, "
             "compiled |", "|---" * 14 + "|"]
    print("\n".join(lines))
    for preset in presets:
        args = train.parse_args(["--model", preset, "--data-path", "unused"])   # its recipe
        cfg = DriftDiTConfig(**DriftDiT_models[preset])
        mae_cfg = MAEConfig(**MAE_models[GPU_MAE[preset]])
        torch.manual_seed(0)
        with device:                            # initialized where it runs: no CPU copy
            model, mae = DriftDiT(cfg), MAEResNet(mae_cfg, with_heads=False)
        mae.eval().requires_grad_(False)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                weight_decay=args.weight_decay, fused=cuda)
        amp = torch.autocast(device.type, torch.bfloat16, enabled=cuda)
        n_groups = max(1, args.n_classes_per_step // 8)
        images = torch.randn(64 * cfg.num_classes if cfg.num_classes <= 16 else 4096,
                             cfg.in_channels, cfg.input_size, cfg.input_size)
        sampler = TensorSampler(images, torch.arange(len(images)) % cfg.num_classes, 0)
        t = {}                                  # phase -> [(start, end)] of this step

        def timed(phase, fn):
            def run(*a, **kw):
                start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
                if cuda:
                    start.record()
                y = fn(*a, **kw)
                end = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
                if cuda:
                    end.record()
                t.setdefault(phase, []).append((start, end))
                return y
            return run

        gen = timed("gen fwd", model)
        phi = timed("encoder fwd", lambda x: feature_groups(mae, x, **ACTIVATION_KWARGS))
        loss_fn = timed("drift loss", field.drift_loss)

        def optimize():
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, args.ema)

        def step(s, groups):                    # train.py's loop body, timed by phase
            t.clear()
            batch = [x.to(device) for x in draw_groups(sampler, cfg, args, s, range(groups))]

            def body():
                with amp:
                    loss = train.generator_loss(gen, phi, *batch, taus=args.taus,
                                                drift_loss=loss_fn)[0]
                timed("backward", loss.backward)()
                timed("optimizer", optimize)()
            timed("step", body)()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = lambda a, b: a.elapsed_time(b) / 1e3 if cuda else b - a
            return {k: sum(seconds(a, b) for a, b in v) for k, v in t.items()}

        while True:                             # the per-GPU share, halved until it fits
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                step(0, n_groups)
                runs = [step(s + 1, n_groups) for s in range(steps)]
                break
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                t.clear()
                torch.cuda.empty_cache()
                if n_groups == 1:
                    raise
                n_groups //= 2
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        n_gen, n_real = n_groups * args.gen_per_label, n_groups * (args.n_pos + args.n_unc)
        mfu = step_flops(cfg, mae_cfg, n_gen, n_real) / med["step"] / peak if peak else None
        mem = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if cuda else "n/a"
        share = lambda k: f"{100 * med.get(k, 0) / med['step']:.0f}%"
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)

        def forward(m):
            with torch.no_grad(), amp:
                m(x, torch.zeros(len(x), dtype=torch.long, device=device), 1.0)
        eager = sdpa_op(lambda: forward(model))
        compiled = "skipped"
        if compile_check:
            t0 = time.perf_counter()
            try:
                fast = torch.compile(model)
                forward(fast)                       # the compile itself
                compiled = f"{sdpa_op(lambda: forward(fast))} (compiled in "
                compiled += f"{time.perf_counter() - t0:.0f} s)"
            except Exception as e:              # report, do not stop the table
                compiled = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        lines.append(
            f"| {preset} | {GPU_MAE[preset]} | {n_groups} x ({args.gen_per_label}, {args.n_pos},"
            f" {args.n_unc}) | {med['step']:.3f} | {n_gen / med['step']:.0f} | {mem} | "
            + (f"{100 * mfu:.1f}%" if mfu else "n/a") + " | "
            + " | ".join(share(k) for k in ("gen fwd", "encoder fwd", "drift loss", "backward",
                                            "optimizer")) + f" | {eager} | {compiled} |")
        print(lines[-1], flush=True)
        del model, mae, ema, opt
        if cuda:
            torch.cuda.empty_cache()
    lines.append("\nMFU: step_flops (bench.py) over the step time and the GPU's dense bf16 "
                 "peak; the phase shares are of the step time (encoder fwd: real and generated "
                 "features; backward: generator and encoder together).")
    lines.append(torchrun_smoke(device))
    text = "\n".join(lines)
    print(lines[-1])
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


def torchrun_smoke(device):
    """A 2-step `torchrun --nproc_per_node=1 train.py --model S4` (NCCL on a GPU, gloo on a
    CPU) on MNIST-5k with a random tiny MAE: the DDP path starts, steps and checkpoints."""
    import tempfile
    from encoder import MAEConfig, MAE_models, MAEResNet
    from models import save_checkpoint
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
    parser = argparse.ArgumentParser(description="Drifting benchmarks")
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
    if args.only in (None, "loss"):
        bench_loss(args.baseline)
    if args.only in (None, "memory"):
        bench_memory()
    if args.only in (None, "models"):
        bench_models()
    if args.only in (None, "train"):
        bench_train(args.baseline)
        bench_cache()
    if args.only in (None, "sample"):
        bench_sample()
    if args.only == "gpu":
        bench_gpu(args.device, args.presets or (["B2", "L2"] if args.device == "cuda" else
                                                ["S2"]), args.steps, not args.no_compile,
                  args.out)
