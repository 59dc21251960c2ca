"""Tests of ablate.py: the paper's ablation tables, toy rows (in this process) and MNIST rows
(a train.py process each, scored with a stand-in network for the Inception)."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import ablate
import fid
from test_fid import LinearFeatures
from test_train_mae import write_standin


def ablate_cli(capsys, *args):
    """`python ablate.py *args` in this process -> what it printed."""
    ablate.main(list(args))
    return capsys.readouterr().out


def test_ablation_table_runs_its_rows_and_skips_finished_ones(tmp_path, capsys):
    """`ablate.py toy --ablation n_pos`: one run per row and seed, a markdown row per table
    row with the mean ratio and the paper's FID, table.md and ablation.png; a rerun reads the
    finished runs (their weights untouched) and prints the same table; the row's flag
    reached the run."""
    argv = ["toy", "--ablation", "n_pos", "--seeds", "0", "1", "--out", str(tmp_path), "--",
            "--steps", "20", "--batch", "64", "--eval-n", "300", "--frames", "0"]
    first = ablate.main(argv)
    assert [line.split(" | ")[0] for line in first] == [f"| N_pos {n}" for n in (1, 16, 32, 64)]
    assert first[0].endswith("| 20.43 |")
    run = tmp_path / "N_pos_16" / "seed1"
    assert json.loads(open(run / "log.txt").read().splitlines()[-1])["seed"] == 1
    weights = run / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert json.loads(f.metadata()["args"])["n_pos"] == 16
    stamp = os.stat(weights).st_mtime_ns
    assert ablate.main(argv) == first
    assert os.stat(weights).st_mtime_ns == stamp
    assert (tmp_path / "table.md").read_text().splitlines()[2:] == first
    assert os.path.getsize(tmp_path / "ablation.png") > 0


def test_ablation_table_trains_rows_once_and_resumes(tmp_path, monkeypatch, capsys):
    """`ablate.py mnist --ablation antisymmetry`, two of its rows (--rows; each row is a
    train.py process, ~15 s here): a run per row with the row's flags (recorded in its
    checkpoint), a line per row with its FID and the paper's; a rerun reads fid.json and
    trains nothing; a row whose FID was lost is scored again from its weights (same number,
    no retraining); the table is written (a stand-in network for the Inception)."""
    from encoder import MAEConfig, MAEResNet
    from checkpoint import read_metadata, save_checkpoint
    monkeypatch.setattr(fid, "DIM", 64)                  # the stand-in's features: fast FIDs
    write_standin(str(tmp_path / "digits.csv.gz"))
    torch.manual_seed(0)
    cfg = MAEConfig(in_channels=1, base_channels=8, layers=(1, 1, 1, 1), num_classes=10)
    save_checkpoint(MAEResNet(cfg, with_heads=False), str(tmp_path / "mae.safetensors"),
                    kind="mae")
    train_args = ["--data-path", str(tmp_path / "digits.csv.gz"), "--mae-ckpt",
                  str(tmp_path / "mae.safetensors"), "--n-classes-per-step", "2",
                  "--gen-per-label", "4", "--n-pos", "3", "--n-unc", "2", "--steps", "2",
                  "--warmup", "1", "--lr", "0.05", "--ema", "0", "--log-every", "1",
                  "--sample-every", "0",
                  "--eval-every", "0", "--snapshot-every", "0", "--device", "cpu"]
    net = LinearFeatures()
    ref = np.random.default_rng(1).integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    mu_r, sigma_r, _ = fid.inception_stats(net, lambda ix: ref[ix], len(ref), 10)
    out = tmp_path / "tab1"
    two = ["V+ only", "V+ - V-"]                                 # --rows: the table's order
    lines, failed = ablate.mnist_table("antisymmetry", str(out), train_args, net, mu_r, sigma_r,
                                       1, 10, "cpu", rows=two)
    assert failed == []
    assert [l.split(" | ")[0] for l in lines] == ["| V+ - V-", "| V+ only"]
    assert lines[0].endswith("| 8.46 |") and lines[1].endswith("| 177.14 |")
    recorded = read_metadata(str(out / "V+_only"))[1]["args"]
    assert (recorded["repel"], recorded["attract"], recorded["fast_loss"]) == (0.0, 1.0, False)
    fids = [float(l.split(" | ")[1]) for l in lines]
    assert len(set(fids)) > 1                                   # the rows trained differently
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("*/model.safetensors")}
    os.remove(out / "V+_only" / "fid.json")                     # as if killed while scoring
    again, _ = ablate.mnist_table("antisymmetry", str(out), train_args, net, mu_r, sigma_r, 1,
                                  10, "cpu", rows=two)
    assert again == lines
    assert stamps == {p: os.stat(p).st_mtime_ns for p in out.glob("*/model.safetensors")}
    np.savez(tmp_path / "ref.npz", mu=mu_r, sigma=sigma_r)
    monkeypatch.setattr(fid, "load_inception", lambda path, device="cpu": net)
    printed = ablate_cli(capsys, "mnist", "--ablation", "antisymmetry", "--weights", "W",
                  "--ref", str(tmp_path / "ref.npz"), "--out", str(out), "--per-class", "1",
                  "--batch", "10", "--rows", *two, "--", *train_args)
    assert (out / "table.md").read_text().splitlines()[2:] == lines and lines[-1] in printed
    from PIL import Image
    wide = Image.open(out / "ablation.png").size                # a panel per row: 2
    # one row: finished above, nothing trains
    ablate_cli(capsys, "mnist", "--ablation", "antisymmetry", "--weights", "W", "--ref",
        str(tmp_path / "ref.npz"), "--out", str(out), "--rows", "V+ only", "--", *train_args)
    assert (out / "table.md").read_text().splitlines()[2:] == [lines[1]]
    assert Image.open(out / "ablation.png").size[0] < wide[0] * 0.75      # 1 panel
    assert stamps == {p: os.stat(p).st_mtime_ns for p in out.glob("*/model.safetensors")}
    with pytest.raises(SystemExit):
        ablate_cli(capsys, "mnist", "--ablation", "antisymmetry", "--weights", "W",
            "--ref", "r.npz", "--out", str(out), "--rows", "V+ - 3V-")
    assert "'V+ - 3V-'" in capsys.readouterr().err
    # a row whose train.py fails (here: --lr 1e30 diverges) is a "failed" line; the loop goes
    # on to the rows after it (here a finished one, read: a row that trains is shown above);
    # table.md is written, then the command exits 1 naming the row
    import subprocess
    real_run = subprocess.run
    def run(argv, **kw):                    # only the "1.5V+ - V-" row gets the diverging lr
        if "--attract" in argv and argv[len(argv) - argv[::-1].index("--attract")] == "1.5":
            argv = [*argv[:argv.index("--lr")], "--lr", "1e30", *argv[argv.index("--lr") + 2:]]
        return real_run(argv, **kw)
    monkeypatch.setattr("subprocess.run", run)
    with pytest.raises(SystemExit) as e:
        ablate_cli(capsys, "mnist", "--ablation", "antisymmetry", "--weights", "W", "--ref",
            str(tmp_path / "ref.npz"), "--out", str(out), "--rows", "1.5V+ - V-", "V+ only",
            "--", *train_args)
    assert "1 row(s) failed" in str(e.value) and "'1.5V+ - V-'" in str(e.value)
    table = (out / "table.md").read_text().splitlines()[2:]
    assert table[0].startswith("| 1.5V+ - V- | failed") and table[1] == lines[1]
    assert not (out / "1.5V+_-_V-" / "fid.json").exists()


def test_row_samples_puts_class_k_seed_j_at_row_k_column_j():
    """The ablation figure's panel: sample (class k, j-th of its class) = sample index
    k + K j as the FID draws it, framed in white, at row k, column j."""
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    from sample import decode, generate
    torch.manual_seed(0)
    model = DriftDiT(DriftDiTConfig(**{**DriftDiT_models["S4"], "depth": 1})).eval()
    with torch.no_grad():
        model.final.linear.weight.normal_(0, 0.5)               # zero-init output: all gray
    grid = ablate.row_samples(model, "cpu", per_class=2)
    assert grid.shape == (10 * 30, 2 * 30, 1)
    for k, j in ((0, 0), (7, 1), (3, 1)):
        one = decode(generate(model, [k + 10 * j], torch.tensor([k]), 1.0, 0, "cpu"))[0]
        assert np.array_equal(grid[k * 30 + 1:k * 30 + 29, j * 30 + 1:j * 30 + 29], one)
        assert (grid[k * 30, j * 30:j * 30 + 30] == 255).all()
    assert not np.array_equal(grid[1:29, 1:29], grid[31:59, 1:29])   # the classes differ
