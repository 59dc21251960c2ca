"""
Benchmarks, printed as Markdown tables with the command line and the machine in the header.

  python bench.py                 # everything below (about 3 minutes on a 2-core CPU)
  python bench.py --only loss     # drift loss value+grad: ours vs its matmul floor vs a plain port
  python bench.py --only memory   # peak memory of drift_loss, whole vs chunked (subprocesses)
  python bench.py --only models   # generator forward+backward of the tiny presets

The matmul floor is what the drift loss cannot avoid: the distances as one batched matmul and
the forces as one more (the three temperatures stacked). The "plain" column is a direct
whole-tensor port of the official drift_loss.py (written here for comparison only).
"""
import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time

import torch

from field import drift_loss

LOSS_SHAPES = [(64, 64, 64, 16, 256), (256, 64, 64, 16, 64), (1024, 64, 64, 16, 32),
               (16, 64, 128, 32, 640)]                               # (rows, C_g, C_p, C_n, S)
MEMORY_SHAPE = dict(C_g=64, C_p=64, C_n=16, S=256)                  # 144 targets per row
TAUS = (0.02, 0.05, 0.2)


def plain_drift_loss(gen, pos, neg, w_neg, taus=TAUS):
    """The official drift_loss.py, line by line, on whole tensors (reference only)."""
    B, C_g, S = gen.shape
    C_n, C_p = neg.shape[1], pos.shape[1]
    with torch.no_grad():
        x = gen.detach()
        y = torch.cat([x, neg, pos], dim=1)
        w = torch.cat([torch.ones(B, C_g), w_neg, torch.ones(B, C_p)], dim=1)
        sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.mT
        dist = sq.clamp_min(1e-8).sqrt()
        scale = (dist * w[:, None, :]).mean() / w.mean()
        s_in = (scale / math.sqrt(S)).clamp_min(1e-3)
        x_n, y_n = x / s_in, y / s_in
        d_n = dist / scale.clamp_min(1e-3)
        d_n = d_n + 100.0 * torch.eye(C_g, C_g + C_n + C_p)[None]
        total = torch.zeros_like(x_n)
        for tau in taus:
            logits = -d_n / tau
            A = (logits.softmax(-1) * logits.softmax(-2)).clamp_min(1e-6).sqrt() * w[:, None, :]
            A_neg, A_pos = A[..., :C_g + C_n], A[..., C_g + C_n:]
            R = torch.cat([-A_neg * A_pos.sum(-1, keepdim=True),
                           A_pos * A_neg.sum(-1, keepdim=True)], dim=-1)
            V = R @ y_n - R.sum(-1, keepdim=True) * x_n
            total += V / (V ** 2).mean().clamp_min(1e-8).sqrt()
        goal = x_n + total
    return ((gen / s_in - goal) ** 2).mean((-1, -2))


def timeit(fn, repeat=7, warmup=2):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def inputs(rows, C_g, C_p, C_n, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(rows, C_g, S, generator=g)
    pos, neg = torch.randn(rows, C_p, S, generator=g) + 0.5, torch.randn(rows, C_n, S, generator=g)
    return gen, pos, neg, torch.rand(rows, C_n, generator=g) * 3


def bench_loss():
    print("\n### drift_loss value + gradient (ms, median of 7)\n")
    print("| rows, C_g, C_p, C_n, S | matmul floor | ours | ours / floor | plain port | "
          "plain / floor |")
    print("|---|---|---|---|---|---|")
    for shape in LOSS_SHAPES:
        gen, pos, neg, w_neg = inputs(*shape)
        rows, C_g, C_p, C_n, S = shape
        y = torch.cat([gen, neg, pos], dim=1)                        # (rows, M, S)
        A = torch.rand(rows, len(TAUS) * C_g, y.shape[1])           # stacked taus
        floor = timeit(lambda: (torch.bmm(gen, y.mT), torch.bmm(A, y)))

        def run(loss_fn):
            x = gen.clone().requires_grad_(True)
            loss = loss_fn(x)
            loss.sum().backward()

        ours = timeit(lambda: run(lambda x: drift_loss(x, pos, neg, w_neg=w_neg)[0]))
        plain = timeit(lambda: run(lambda x: plain_drift_loss(x, pos, neg, w_neg)))
        print(f"| {shape} | {floor * 1e3:.1f} | {ours * 1e3:.1f} | {ours / floor:.2f} | "
              f"{plain * 1e3:.1f} | {plain / floor:.2f} |")


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
    if mode == "plain":
        loss = plain_drift_loss(gen, pos, neg, w_neg)
    else:
        budget = 2 ** 62 if mode == "whole" else 0
        chunk = rows if mode == "whole" else None
        loss, _ = drift_loss(gen, pos, neg, w_neg=w_neg, chunk_rows=chunk, memory_budget=budget)
    loss.sum().backward()
    print((_rss_kb("VmHWM:") - base) * 1024)


def bench_memory(rows_list=(2048, 8192), big=65536):
    """Peak memory above the inputs (gen, pos, neg and gen.grad), in fresh subprocesses."""
    def peak(mode, rows):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(rows)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return None
        return int(out.stdout.strip().splitlines()[-1])

    s = MEMORY_SHAPE
    print(f"\n### drift_loss peak memory above its inputs (GB; C_g={s['C_g']}, "
          f"targets={s['C_g'] + s['C_p'] + s['C_n']}, S={s['S']})\n")
    print("| rows | plain port | ours, whole (one chunk, keep all) | ours, chunked "
          "(budget 0) | chunked / whole |")
    print("|---|---|---|---|---|")
    per_row = {}
    for rows in rows_list:
        p = {m: peak(m, rows) for m in ("plain", "whole", "chunked")}
        per_row = {m: p[m] / rows for m in p if p[m]}
        print(f"| {rows} | {p['plain'] / 1e9:.2f} | {p['whole'] / 1e9:.2f} | "
              f"{p['chunked'] / 1e9:.2f} | {p['chunked'] / p['whole']:.3f} |")
    chunked_big = peak("chunked", big)
    est = {m: per_row[m] * big / 1e9 for m in ("plain", "whole")}
    measured = f"{chunked_big / 1e9:.2f}" if chunked_big else "(did not run)"
    ratio = f"{chunked_big / 1e9 / est['whole']:.3f}" if chunked_big else "-"
    print(f"| {big} | {est['plain']:.1f} (extrapolated) | {est['whole']:.1f} (extrapolated) | "
          f"{measured} (measured) | {ratio} |")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Drifting benchmarks")
    parser.add_argument("--only", choices=["loss", "memory", "models"], help="one table only")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "ROWS"),
                        help=argparse.SUPPRESS)                      # internal
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        sys.exit(0)
    print(f"## `python {' '.join(sys.argv)}`\n")
    print(f"{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads | "
          f"torch {torch.__version__} | Python {platform.python_version()}")
    if args.only in (None, "loss"):
        bench_loss()
    if args.only in (None, "memory"):
        bench_memory()
    if args.only in (None, "models"):
        bench_models()
