"""Tests of toy.py: the 2-D distributions, the energy distance, the toy run."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import toy
from models import MLP
from toy import TOY_DATA, checkerboard


def test_checkerboard_lives_on_the_dark_cells():
    """Without noise, every checkerboard point lies in one of the 8 cells with i + j even,
    and all 8 cells are used about equally."""
    x = checkerboard(40000, torch.Generator().manual_seed(0), noise=0.0)
    assert x.min() >= -1 and x.max() <= 1
    cell = ((x + 1) / 0.5).floor().long().clamp(max=3)              # (n, 2) cell indices
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    used = counts[counts > 0]
    assert len(used) == 8 and used.min() > 0.9 * 40000 / 8


def test_toy_samplers_are_seeded():
    """The same generator seed gives the same points (runs are reproducible)."""
    for sample in TOY_DATA.values():
        a = sample(100, torch.Generator().manual_seed(3))
        b = sample(100, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (100, 2)


def test_energy_distance():
    """Zero for a set with itself, ~2 E|X-X'|/n for two independent sets (the floor),
    and clearly larger for a shifted distribution."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert abs(toy.energy_distance(x, x)) < 1e-12
    floor = toy.energy_distance(x, y)
    expected = 2 * torch.cdist(x.double(), x.double()).mean().item() / 2000
    assert 0.3 * expected < floor < 3 * expected
    assert toy.energy_distance(x, y + 0.3) > 20 * floor


def test_short_toy_run_learns(tmp_path):
    """A short toy run moves q toward p: the energy distance falls far below that of the
    untrained generator, and the run writes its picture, strip, curves, weights and log."""
    args = toy.parse_args(["--steps", "150", "--batch", "256", "--n-pos", "256",
                                  "--eval-n", "1000", "--frames", "0,150",
                                  "--out", str(tmp_path)])
    untrained = MLP()
    torch.manual_seed(args.seed)
    held = checkerboard(1000, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ed0 = toy.energy_distance(untrained(torch.randn(1000, 32)), held)
    summary = toy.train(args)
    assert summary["energy_distance"] < 0.2 * ed0
    for name in ("toy.png", "toy_evolution.png", "toy_curves.png", "model.safetensors",
                 "log.txt"):
        assert (tmp_path / name).stat().st_size > 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["kind"] == "mlp"
    assert not os.path.exists(str(tmp_path / "model.safetensors.tmp"))


@pytest.mark.parametrize("argv, flag", [
    (["--frames", "0,151"], "--frames"), (["--frames", "0,-5"], "--frames"),
    (["--frames", "0,abc"], "--frames"), (["--steps", "0"], "--steps"),
    (["--batch", "-1"], "--batch"), (["--n-pos", "0"], "--n-pos"), (["--eval-n", "0"], "--eval-n"),
    (["--log-every", "0"], "--log-every"), (["--tau", "0"], "--tau"), (["--lr", "nan"], "--lr"),
])
def test_bad_flags_are_named_before_anything_is_written(tmp_path, capsys, argv, flag):
    """A frame past --steps (which used to crash after log.txt, before the weights) or a count,
    interval, tau or lr <= 0 is a usage error naming the flag; --out is not even created."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        toy.parse_args(["--steps", "150", "--out", str(out)] + argv)
    assert e.value.code == 2 and f"error: {flag}" in capsys.readouterr().err
    assert not out.exists()
    assert toy.parse_args(["--steps", "150", "--out", str(out)]).frames    # default: dropped


def test_a_run_in_out_is_not_replaced(tmp_path, capsys):
    """--out holding a run (log.txt or model.safetensors) is refused, its files untouched, unless
    --overwrite; other failures end in one 'toy.py: error:' line, not a traceback."""
    for name in ("log.txt", "model.safetensors"):
        run = tmp_path / name.split(".")[0]
        os.makedirs(run)
        (run / name).write_text("another run")
        with pytest.raises(SystemExit):
            toy.parse_args(["--out", str(run)])
        assert "pass --overwrite or a new --out" in capsys.readouterr().err
        assert (run / name).read_text() == "another run"
        assert toy.parse_args(["--out", str(run), "--overwrite"]).overwrite
    (tmp_path / "file").write_text("not a folder")
    done = subprocess.run([sys.executable, "toy.py", "--out", str(tmp_path / "file")],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("toy.py: error: [Errno 17]")


@pytest.mark.parametrize("flags", [["--kernel", "gaussian"], ["--kernel-norm", "sinkhorn"],
                                   ["--repel", "0"], ["--attract", "1.5"]])
def test_toy_ablation_flags_change_the_run(tmp_path, flags):
    """Each ablation flag reaches drift_field: a short run ends elsewhere than the default."""
    base = ["--steps", "20", "--batch", "64", "--n-pos", "64", "--eval-n", "300", "--frames", "0"]
    a = toy.train(toy.parse_args(base + ["--out", str(tmp_path / "a")]))
    b = toy.train(toy.parse_args(base + flags + ["--out", str(tmp_path / "b")]))
    assert a["energy_distance"] != b["energy_distance"]
