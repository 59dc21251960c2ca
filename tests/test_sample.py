"""Tests of sample.py: per-sample seeds make the .npz independent of the number of processes
and of the batch size; the grid; EMA vs raw weights; clear errors for wrong checkpoints.

The checkpoint is a tiny randomly initialised S4 (28x28x1, 10 classes, depth 1). DriftDiT's
zero-initialised output layer makes every sample exactly 0 at init, so the final layer is
perturbed before saving (raw and EMA differently) to make images differ.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sample
from checkpoint import save_checkpoint
from models import MLP, DriftDiT, DriftDiT_models
from sample import generate, load_generator
from vae import VAE_SCALE, AutoencoderKL, VAEConfig, VAE_models, load_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def tiny(preset="S4", seed=0):
    torch.manual_seed(seed)
    model = DriftDiT.from_config({**DriftDiT_models[preset], "depth": 1})
    torch.nn.init.normal_(model.final.linear.weight, std=0.5)
    torch.nn.init.normal_(model.final.adaLN.weight, std=0.1)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model.safetensors"
    model = tiny()
    ema = copy.deepcopy(model)
    torch.nn.init.normal_(ema.final.linear.weight, std=0.5)
    save_checkpoint(model, path, ema=ema)
    return str(path)


def run(args, nproc=0):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"] if nproc else [sys.executable]) + ["sample.py", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr


def test_npz_same_for_any_process_count_and_batch(ckpt, tmp_path):
    """The paper's FID protocol needs a sample set that a rerun on other hardware reproduces:
    1 process (batch 3) and torchrun with 2 gloo processes (batch 4) write identical uint8
    NHWC arr_0 with the same labels, an equal count per class."""
    outs = []
    for nproc, batch in ((0, 3), (2, 4)):
        out = tmp_path / f"s{nproc}_{batch}.npz"
        rc, log = run(["--ckpt", ckpt, "--num-samples", "20", "--batch", str(batch),
                       "--out", str(out)], nproc)
        assert rc == 0 and "img/s" in log, log
        outs.append(np.load(out))
    ref = outs[0]
    assert ref["arr_0"].shape == (20, 28, 28, 1) and ref["arr_0"].dtype == np.uint8
    assert np.bincount(ref["labels"], minlength=10).tolist() == [2] * 10
    flat = ref["arr_0"].reshape(20, -1)
    assert len(np.unique(flat, axis=0)) == 20 and flat.std() > 10  # distinct, not constant
    for o in outs[1:]:
        np.testing.assert_array_equal(o["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(o["labels"], ref["labels"])
    assert not list(tmp_path.glob("*.part*"))  # the per-rank shares are cleaned up


def test_grid_grayscale_and_ema_default(ckpt, tmp_path):
    """The grid has one row per chosen class; a 1-channel model writes a grayscale PNG;
    EMA weights are the default and --raw picks the other weights. (In this process:
    sample.main turns gradients off for the process, so they are turned back on.)"""
    pngs = {}
    for flag in ([], ["--raw"]):
        out = tmp_path / f"grid{len(flag)}.png"
        try:
            sample.main(["--ckpt", ckpt, "--classes", "3", "7", "--per-class", "3",
                         "--out", str(out), *flag])
        finally:
            torch.set_grad_enabled(True)
        pngs[len(flag)] = Image.open(out)
    assert pngs[0].mode == "L" and pngs[0].size == (3 * 30 + 2, 2 * 30 + 2)
    assert not np.array_equal(np.asarray(pngs[0]), np.asarray(pngs[1]))


def test_wrong_checkpoints_are_refused(tmp_path):
    """Clear errors: another kind of weights file (an encoder), a "gen" file whose weights are
    not the architecture of its config, a latent model without the VAE, a pixel model with one,
    an unbalanced count."""
    model = tiny()
    save_checkpoint(model, tmp_path / "mae.safetensors", kind="mae")
    with pytest.raises(ValueError, match="kind='mae', expected 'gen'"):
        load_generator(str(tmp_path / "mae.safetensors"), "cpu")
    other = {**DriftDiT_models["S2"], "depth": 1}     # checksummed, but not its weights' config
    save_checkpoint(model, tmp_path / "arch.safetensors", config=other)
    with pytest.raises(ValueError, match="not a DriftDiT generator checkpoint"):
        load_generator(str(tmp_path / "arch.safetensors"), "cpu")
    save_checkpoint(tiny("S2"), tmp_path / "latent.safetensors")
    with pytest.raises(ValueError, match="needs the SD-VAE decoder: pass --vae"):
        load_generator(str(tmp_path / "latent.safetensors"), "cpu")
    save_checkpoint(model, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="a pixel model needs no --vae"):
        load_generator(str(tmp_path / "ok.safetensors"), "cpu",
                       vae=AutoencoderKL(VAEConfig(**VAE_models["tiny"])))
    rc, log = run(["--ckpt", str(tmp_path / "ok.safetensors"), "--num-samples", "15"])
    assert rc != 0 and "not a multiple of the 10 classes" in log, log


def test_latent_model_decodes_through_vae(tmp_path):
    """A latent generator (32x32x4, S2) with --vae: its samples, divided by VAE_SCALE, go through
    the SD-VAE decoder, and the PNG holds ((image + 1) / 2).clip(0, 1) x 255 truncated. The VAE
    is a tiny random one written by diffusers (2 stages: 32x32 latents -> 64x64 images) and the
    expected pixels come from diffusers' own decode."""
    from diffusers import AutoencoderKL as DiffusersVAE
    torch.manual_seed(0)
    ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                       layers_per_block=1, sample_size=64).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "vae.st")
    save_checkpoint(tiny("S2"), tmp_path / "latent.safetensors")
    out = tmp_path / "grid.png"
    rc, log = run(["--ckpt", str(tmp_path / "latent.safetensors"), "--vae",
                   str(tmp_path / "vae.st"), "--classes", "5", "9", "--per-class", "2",
                   "--out", str(out)])
    assert rc == 0, log
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)

    model = load_generator(str(tmp_path / "latent.safetensors"), "cpu", vae=load_vae(
        str(tmp_path / "vae.st")))
    z = generate(model, [0, 1, 2, 3], torch.tensor([5, 5, 9, 9]), 1.0, 0, "cpu")  # (4, 4, 32, 32)
    with torch.no_grad():
        y = ref.decode(z / VAE_SCALE).sample                                       # (4, 3, 64, 64)
    want = (((y + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(4):
        r, c = 2 + k // 2 * 66, 2 + k % 2 * 66
        diff = np.abs(grid[r:r + 64, c:c + 64].astype(int) - want[k].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01  # float32 rounding at the truncation


def main(monkeypatch, *args):
    """`python sample.py *args` in this process (grad mode restored after main() turns it off)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    with torch.enable_grad():
        sample.main()


def test_non_finite_outputs_are_refused_before_decode(tmp_path, monkeypatch):
    """Finite but huge weights overflow to inf: decode's NaN -> 0 would write black images with
    exit 0, so the batch is checked before decode and neither the grid nor the .npz (nor its
    per-rank shares) is written."""
    model = tiny()
    with torch.no_grad():
        model.final.linear.weight.fill_(1e38)                               # outputs +-inf
    save_checkpoint(model, tmp_path / "broken.safetensors")
    for mode in (["--per-class", "2"], ["--num-samples", "20"]):  # stops at the 1st batch
        out = tmp_path / ("s.npz" if "--num-samples" in mode else "s.png")
        with pytest.raises(ValueError, match=r"broken.safetensors: 8 of 8 samples drawn are NaN "
                                             r"or inf, nothing written.*try --raw"):
            main(monkeypatch, "--ckpt", str(tmp_path / "broken.safetensors"), "--out", str(out),
                 "--batch", "8", *mode)
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--per-class", "0"], "--per-class 0: must be > 0"),
    (["--batch", "0"], "--batch 0: must be > 0"),
    (["--scale", "0"], "--scale 0: must be > 0"),
    (["--num-samples", "-10"], "--num-samples -10: must be >= 0"),
    (["--cfg", "nan"], "--cfg nan: the CFG scale must be a finite number"),
    (["--cfg", "inf"], "--cfg inf: the CFG scale must be a finite number"),
    (["--out", "{tmp}/noext"], "--out {tmp}/noext: a grid is an image; name it e.g. samples.png"),
    (["--num-samples", "10", "--out", "{tmp}/s.png"], "--num-samples writes an .npz"),
    (["--out", "{tmp}/nodir/s.png"], "no folder '{tmp}/nodir'; create it first"),
])
def test_bad_flags_exit_2_before_any_work(ckpt, tmp_path, monkeypatch, capsys, args, message):
    """Each count/size flag, a non-finite --cfg and an --out that is not the file that would be
    written stop at parse time with exit 2 and a message naming the flag; nothing is written
    (without the checks these runs sample, then crash or write another file)."""
    args = [a.format(tmp=tmp_path) for a in args]
    args += [] if "--out" in args else ["--out", str(tmp_path / "s.png")]
    with pytest.raises(SystemExit) as e:
        main(monkeypatch, "--ckpt", ckpt, *args)
    assert e.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_existing_out_is_kept_unless_overwrite(ckpt, tmp_path, monkeypatch, capsys):
    """An existing --out is refused (exit 2, the file as it was); --overwrite replaces it with
    the grid, through a temp file that does not stay behind."""
    out = tmp_path / "grid.png"
    out.write_bytes(b"old")
    with pytest.raises(SystemExit) as e:
        main(monkeypatch, "--ckpt", ckpt, "--per-class", "1", "--out", str(out))
    assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    main(monkeypatch, "--ckpt", ckpt, "--per-class", "1", "--out", str(out), "--overwrite")
    assert Image.open(out).size == (30 + 2, 10 * 30 + 2) and os.listdir(tmp_path) == ["grid.png"]


def test_cli_errors_are_one_line_once(tmp_path, monkeypatch, capsys):
    """A toy (kind "mlp") or MAE checkpoint ends with `sample.py: error: ...` and exit 1, no
    traceback, nothing written; under torchrun only rank 0 prints it; Ctrl-C exits 130."""
    save_checkpoint(MLP(), tmp_path / "toy.safetensors", kind="mlp",
                    config=dict(kind="mlp", noise_dim=32))
    rc, log = run(["--ckpt", str(tmp_path / "toy.safetensors"), "--out",
                   str(tmp_path / "s.png")])
    assert rc == 1 and "Traceback" not in log, log
    assert "sample.py: error: " in log and "kind='mlp', expected 'gen' weights" in log, log
    save_checkpoint(tiny(), tmp_path / "mae.safetensors", kind="mae")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tmp_path / "mae.safetensors"),
                                      "--out", str(tmp_path / "s.png")])
    with torch.enable_grad(), pytest.raises(SystemExit) as e:
        sample.cli()
    assert e.value.code.startswith("sample.py: error: ") and "kind='mae'" in e.value.code

    def fails(exc):
        def main():
            raise exc
        return main
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: exit 1, silent
    monkeypatch.setattr(sample, "main", fails(ValueError("bad input")))
    with pytest.raises(SystemExit) as e:
        sample.cli()
    assert e.value.code == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sample, "main", fails(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        sample.cli()
    assert e.value.code == 130 and "sample.py: interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["mae.safetensors", "toy.safetensors"]
