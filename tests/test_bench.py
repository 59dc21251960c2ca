"""bench.py's GPU table cannot rot: its FLOP formulas equal a count of the matmul and conv
shapes (torch's FlopCounterMode; the paper-size MAEs on meta tensors, shapes only), and the
whole table runs on a CPU with the tiny preset, torchrun smoke step included."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import metrics
from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, feature_groups
from models import DriftDiT, DriftDiTConfig, DriftDiT_models


def counted(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("preset,depth", [("S2", None), ("S4", None), ("S8", None),
                                          ("B2", 1), ("L2", 1), ("L16", 1)])
def test_dit_flops_formula_matches_the_counted_matmuls(preset, depth):
    """dit_flops(cfg) per sample == the counted FLOPs of one forward, within 1%. Paper widths
    and token counts at one block (the formula is linear in the depth), so a CPU runs them.
    Attention through the math SDPA backend, whose matmuls the counter sees (it has no
    formula for the CPU flash kernel)."""
    from dataclasses import replace
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = DriftDiTConfig(**DriftDiT_models[preset])
    cfg = replace(cfg, depth=depth or cfg.depth)
    torch.manual_seed(0)
    model, B = DriftDiT(cfg), 2
    noise = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        n = counted(lambda: model(noise, torch.zeros(B, dtype=torch.long), torch.ones(B)))
    assert abs(metrics.dit_flops(cfg) * B / n - 1) < 0.01, (metrics.dit_flops(cfg) * B, n)


@pytest.mark.parametrize("preset,size", [("tiny", 32), ("mnist", 28), ("pixel_tiny", 64),
                                         ("latent_640", 32), ("pixel_640", 256)])
def test_mae_flops_formula_matches_the_counted_convs(preset, size):
    """mae_flops(cfg, size) == the counted FLOPs of feature_groups (the encoder as the drift
    loss runs it) within 1%; the 28x28 MNIST case checks the ceil of the odd stride-2 grids."""
    cfg = MAEConfig(**MAE_models[preset])
    dev = "meta" if cfg.base_channels > 64 else "cpu"
    c = cfg.in_channels
    with torch.device(dev):
        mae, x = MAEResNet(cfg, with_heads=False).eval(), torch.randn(2, c, size, size)
    with torch.no_grad():
        n = counted(lambda: feature_groups(mae, x, **ACTIVATION_KWARGS))
    assert abs(metrics.mae_flops(cfg, size) * 2 / n - 1) < 0.01, (metrics.mae_flops(cfg, size), n)


def test_gpu_table_runs_on_a_cpu_with_the_tiny_preset(tmp_path, monkeypatch):
    """`python bench.py --only gpu --device cpu`: one row for S2 (its per-GPU share of 8 GPUs:
    1 class group, one pass) with a positive step time, memory.py's estimate of the row's
    plan in its column, phase shares, the SDPA kernel the profiler saw, written to --out;
    and the 1-process torchrun step ok. The estimate is recorded, not run (14 s on fake
    tensors here; memory.estimate itself: tests/test_micro.py)."""
    import gpu_check
    asked = []
    monkeypatch.setattr(gpu_check, "estimate", lambda *a, **kw: asked.append(a) or dict(
        peak=1.5 * 2 ** 30))
    out = tmp_path / "gpu.md"
    bench.bench_gpu(torch.device("cpu"), ["S2"], steps=1, compile_check=False, out=str(out),
                    with_estimate=True)
    row = next(line for line in out.read_text().splitlines() if line.startswith("| S2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "tiny" and cells[2] == "1 x (16, 16, 4)" and cells[3] == "1 x 1"
    assert float(cells[4]) > 0 and cells[7] == "1.5" and asked[0][:3] == ("S2", 1, 1)
    assert all(c.endswith("%") for c in cells[9:14]) and "flash_attention" in cells[14]
    assert "2 steps + checkpoint: ok" in bench.torchrun_smoke(torch.device("cpu"))
