"""
Benchmarks, printed as Markdown tables with the command line and the machine in the header.

  python bench.py                 # all but gpu: ~8 min on 2 cores, + 5.5 for step (2026-12-07)
  python bench.py --only loss     # drift loss value+grad vs its matmul floor
  python bench.py --only memory   # peak memory of drift_loss, whole vs chunked (subprocesses)
  python bench.py --only models   # generator forward+backward of the tiny presets
  python bench.py --only train    # one train.py --stage gen step of the tiny CPU presets
  python bench.py --only sample   # sample.py one-step sampling, samples/s of the tiny presets
  python bench.py --only step     # issue 29: drift-loss calls at L2, the draw, the S4 step
  python bench.py --only gpu --out gpu.md   # L2, B2, L16 at the paper's per-GPU batch, 1 GPU
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
import datetime
import importlib.util
import os
import platform
import random
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import field
import field_fast
from field import drift_loss
from gpu_check import TINY, bench_gpu, setup

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


def bench_train(baseline=None, repeat=15):
    """One generator step as train.py's loop runs it (draw_groups, generator_step: DriftDiT
    forward, feature groups, drift_loss per group, backward; clip, AdamW, EMA), with each
    drift loss, in shuffled turns: a change in the load of the machine hits all alike."""
    from step import generator_step
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
            opt.zero_grad(set_to_none=True)
            generator_step(model, model, phi, batch, len(groups), taus=args.taus,
                           drift_loss=counted)
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
# Issue 29 on a CPU: the drift loss's torch calls at L2's shapes, the draw, the S4 step
# ------------------------------------------------------------------------------------------
class OpCount(TorchDispatchMode):
    """Counts the torch operators that reach the dispatcher (what a GPU launches, roughly)."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def l2_loss_calls(groups):
    """The drift loss's operators in one step of `groups` L2 class groups on one GPU: every
    feature group of the MAE-640 (shapes from a fake forward), rows = groups x tokens, 64
    generated, 64 positive, 32 unconditional per row; fake tensors (no compute). -> {chunk
    sizing: operators}: the old 4 MB chunks on every device, today's 256 MB on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from encoder import MAE_models, MAEConfig, MAEResNet
    from step import features
    with torch.device("meta"):
        mae = MAEResNet(MAEConfig(**MAE_models["latent_640"]), with_heads=False)
    out = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        shapes = {k: v.shape[1:] for k, v in features(
            mae.to_empty(device="cpu").eval(), torch.randn(1, 4, 32, 32)).items()}
        for sizing, chunk in (("4 MB chunks (before)", 2 ** 22), ("256 MB (GPU now)", 2 ** 28)):
            with OpCount() as count:
                for T, S in shapes.values():
                    gen, pos, unc = (torch.randn(groups * T, c, S) for c in (64, 64, 32))
                    drift_loss(gen, pos, unc, w_neg=torch.rand(groups * T, 32), taus=TAUS,
                               chunk_bytes=chunk)
            out[sizing] = count.n
    return out, len(shapes)


def bench_step(repeat=7):
    """Before and after, in one run: the drift loss's torch calls per step at L2's shapes;
    the per-step draw of 16 class groups over ImageNet's 1,281,167 labels (randperm of all
    of them per unconditional draw before); one S4 step (loop body before: generator_loss +
    backward + a per-parameter EMA; now: generator_step + the _foreach EMA); and the cost of
    exact statistics with micro-batches (S4, 2 passes) against per-pass statistics."""
    import data
    from config import draw_numbers
    from models import DriftDiT_models, DriftDiTConfig, update_ema
    from step import generator_loss, generator_step
    print("\n### Issue 29 on a CPU: before and after, in one run\n")
    print("| measure | before | after | after / before |\n|---|---|---|---|")
    counts = {}
    for groups in (1, 16, 2):
        calls, n = l2_loss_calls(groups)
        counts[groups] = a, b = tuple(calls.values())
        if groups != 2:
            print(f"| drift-loss operators per step, L2, {groups} group(s) per GPU in one pass, "
                  f"{n} feature groups (fake tensors) | {a} | {b} | {b / a:.3f} |")
    plan = 8 * 3 * counts[2][1]             # 8 parts x (2 sweeps + the gradient pass)
    print(f"| the same, L2's plan: 16 groups as 8 passes of 2, exact statistics (before: one "
          f"pass of 16, 780 GiB) | {counts[16][0]} | {plan} | {plan / counts[16][0]:.3f} |")
    labels = torch.arange(1_281_167) % 1000
    sampler = data.TensorSampler(torch.zeros(len(labels), 1, 1, 1), labels, 0)
    cfg, old = DriftDiTConfig(**DriftDiT_models["L2"]), data._choose
    numbers = dict(seed=0, n_classes=128, n_gen=64, n_pos=64, n_unc=32, cfg_power=3.0,
                   no_cfg_frac=0.5)

    def draw(k, s):
        data._choose = (lambda n, k, g: torch.randperm(n, generator=g)[:k] if k <= n else
                        old(n, k, g)) if k == "before" else old
        data.draw_groups(sampler, cfg, s, range(16), **numbers)
    t = in_turns(draw, ["before", "after"], repeat)
    data._choose = old
    print(f"| draw of 16 groups (64 pos, 32 unc), 1.28M labels, ms | {t['before'] * 1e3:.1f} | "
          f"{t['after'] * 1e3:.2f} | {t['after'] / t['before']:.4f} |")
    args, cfg, model, ema, opt, _, phi, sampler = setup("S4")
    kw = dict(taus=args.taus, drift_loss=field_fast.drift_loss, a=args.attract, b=args.repel)
    draw_s4 = lambda s: data.draw_groups(sampler, cfg, s, range(10), **draw_numbers(args))

    def old_ema():
        params = dict(model.named_parameters())
        for name, p in ema.named_parameters():
            p.mul_(args.ema).add_(params[name].detach(), alpha=1 - args.ema)

    def step(k, s):
        batch = draw_s4(s)
        opt.zero_grad(set_to_none=True)
        if k == "before":
            generator_loss(model, phi, *batch, **kw)[0].backward()
        elif k == "per-pass stats":
            for r in (slice(0, 5), slice(5, 10)):
                part = [x[r] for x in batch[:4]] + [x[r.start * 8:r.stop * 8] for x in batch[4:]]
                (generator_loss(model, phi, *part, **kw)[0] / 2).backward()
        else:
            generator_step(model, model, phi, batch, 5 if k == "exact, 2 passes" else 10, **kw)
        opt.step()
        old_ema() if k == "before" else update_ema(ema, model, args.ema)
    t = in_turns(step, ["before", "after", "per-pass stats", "exact, 2 passes"], repeat, 1, True)
    print(f"| one S4 step (10 groups, fast loss), ms | {t['before'] * 1e3:.0f} | "
          f"{t['after'] * 1e3:.0f} | {t['after'] / t['before']:.3f} |")
    print(f"| S4 in 2 passes: per-pass statistics (inexact) vs exact (2 no-grad sweeps), ms | "
          f"{t['per-pass stats'] * 1e3:.0f} | {t['exact, 2 passes'] * 1e3:.0f} | "
          f"{t['exact, 2 passes'] / t['per-pass stats']:.3f} |")


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
    parser.add_argument("--only", choices=["loss", "memory", "models", "train", "sample", "step",
                                           "gpu"], help="one table only (gpu: not by default)")
    parser.add_argument("--device", default="cuda", help="gpu table: cuda, or cpu (tiny presets)")
    parser.add_argument("--presets", nargs="+", help="gpu table: DriftDiT presets "
                        "(default: L2 B2 L16 on cuda, S2 on cpu)")
    parser.add_argument("--steps", type=int, default=2, help="gpu table: timed warm steps")
    parser.add_argument("--estimate", action="store_true", help="gpu table: memory.py's "
                        "estimate of each row's peak beside the measured one (minutes)")
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
                  sample=[bench_sample], step=[bench_step])
    for table in (fn for name, fns in tables.items() if args.only in (None, name) for fn in fns):
        table()
    if args.only == "gpu":          # gpu_check.py: each row written as it is measured
        device = torch.device(args.device)
        bench_gpu(device, args.presets or (["L2", "B2", "L16"] if device.type == "cuda" else
                                           ["S2"]), args.steps, not args.no_compile, args.out,
                  args.estimate)
        smoke = torchrun_smoke(device)
        print(smoke)
        if args.out:
            with open(args.out, "a") as f:
                print(smoke, file=f)
