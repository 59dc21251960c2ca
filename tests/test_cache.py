"""Tests of cache.py: the latent cache made under torchrun (2 gloo processes) from an
ImageNet-layout folder, resumed, refused when its settings differ or a shard is corrupt, and read
back memory-mapped through data.TensorSampler and train.py --data latents.

The images are test_data.py's folder (small PNG/JPEG files, one corrupt JPEG); the VAE is a tiny
random diffusers AutoencoderKL saved in the diffusers format (diffusers: a test dependency), with
its posterior std pushed to ~3e-7 so that a cached posterior sample equals the posterior mean to
float tolerance."""
import os
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from PIL import Image
from safetensors.torch import load_file, save_file

from cache import LatentCache, cache_latents, mmap_safetensors, shard_path, shard_skipped
from data import TensorSampler, center_crop_arr, image_folder, to_tensor
from test_data import SIZE, folder  # noqa: F401 (a fixture: the same image folder)
from vae import load_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    torch.manual_seed(0)
    ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                       layers_per_block=1, latent_channels=4, norm_num_groups=32)
    with torch.no_grad():                       # logvar = -100 -> clamped -30 -> std 3e-7
        ref.quant_conv.weight[4:] = 0
        ref.quant_conv.bias[4:] = -100
    path = tmp_path_factory.mktemp("vae") / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(folder, vae_file, tmp_path_factory):
    """The cache made by `torchrun --nproc_per_node=2 cache.py` (gloo, CPU), 2 images per
    shard (5 shards: ranks 0 and 1 interleave). -> (cache dir, completed process)."""
    root, _ = folder
    out = str(tmp_path_factory.mktemp("cache") / "latents")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", os.path.join(ROOT, "cache.py"),
           "--images", root, "--vae", vae_file, "--out", out, "--size", str(SIZE),
           "--shard-size", "2", "--batch", "2", "--workers", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run


def test_cache_two_processes_every_image_once(folder, cache):
    """Every readable image is in the cache once (as itself and its flip) with its label; the
    corrupt file is skipped, counted and named; the sampler reads it back."""
    root, good = folder
    out, run = cache
    assert "n02_9.JPEG" in run.stderr                          # the warning names the file
    assert "9 images x 2 flips" in run.stdout and "1 unreadable files skipped" in run.stdout
    paths, labels, _ = image_folder(root)
    lc = LatentCache(out)
    index = torch.cat([torch.from_numpy(np.array(mmap_safetensors(shard_path(out, k))[0]
                                                 ["index"])) for k in range(5)])
    assert sorted(paths[i] for i in index.tolist()) == good    # each readable image once
    assert torch.equal(lc.labels, labels[index])
    assert lc.shape == (4, SIZE // 2, SIZE // 2)                # the tiny VAE halves once
    sampler = TensorSampler(lc, lc.labels, seed=0)
    pos, unc = sampler.draw_group(1, 3, 2, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 4, 16, 16) and unc.shape == (2, 4, 16, 16)


def test_cache_flip_pair_and_choice(folder, vae_file, cache):
    """An entry is (encode(x), encode(flip(x))) x 0.18215 (std ~0: sample = mean), and get()
    returns either with p = 0.5, drawn from the generator."""
    out, _ = cache
    paths, _, _ = image_folder(folder[0])
    lc = LatentCache(out)
    vae = load_vae(vae_file)
    arrays, _ = mmap_safetensors(shard_path(out, 0))
    i = int(arrays["index"][0])
    x = to_tensor(center_crop_arr(Image.open(paths[i]).convert("RGB"), SIZE))[None]
    pair = torch.from_numpy(np.array(arrays["latents"][0]))    # (2, 4, h, w)
    torch.testing.assert_close(pair[0], vae.encode(x, sample=False)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pair[1], vae.encode(x.flip(3), sample=False)[0], rtol=1e-4,
                               atol=1e-5)
    assert (pair[0] - pair[1]).abs().max() > 1e-2
    got = lc.get(torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    is_flip = [torch.equal(g, pair[1]) for g in got]
    assert all(torch.equal(g, pair[int(f)]) for g, f in zip(got, is_flip))
    assert 16 < sum(is_flip) < 48


def test_cache_resume_is_world_size_independent(folder, vae_file, cache, tmp_path):
    """A shard removed (an interrupted run) is redone by a 1-process run with another batch size,
    equal to the 2-process one: per-image noise seeds, shards written whole."""
    out = str(tmp_path / "copy")
    shutil.copytree(cache[0], out)
    before = load_file(shard_path(out, 3))
    os.remove(shard_path(out, 3))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCache(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache_latents(folder[0], out, vae_file, SIZE, shard_size=2, batch=3, workers=1)
    after = load_file(shard_path(out, 3))
    assert after.keys() == before.keys()
    assert torch.equal(after["index"], before["index"]) and torch.equal(after["labels"],
                                                                        before["labels"])
    # the same noise; the VAE's convolutions sum in another order with another thread count
    torch.testing.assert_close(after["latents"], before["latents"], rtol=1e-5, atol=1e-6)
    assert len(LatentCache(out)) == 9


def test_cache_refuses_other_vae_size_and_corruption(folder, vae_file, cache, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(cache[0], out)
    other = str(tmp_path / "other.safetensors")
    shutil.copy(vae_file, other)
    with open(other, "ab") as f:
        f.write(b" ")                                          # other bytes: another VAE
    with pytest.raises(ValueError, match="other settings.*vae"):
        cache_latents(folder[0], out, other, SIZE, shard_size=2)
    with pytest.raises(ValueError, match="other settings.*size"):
        cache_latents(folder[0], out, vae_file, 64, shard_size=2)
    with pytest.raises(ValueError, match="made with size 32, not 64"):
        LatentCache(out, size=64)
    with open(shard_path(out, 2), "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match="shard_00002.safetensors is corrupt"):
        LatentCache(out)
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentCache(str(tmp_path))


def test_bad_json_names_its_file(folder, vae_file, tmp_path):
    """A broken index.json is named (by reading and by a rerun, which then writes nothing), and
    so is a shard whose 'skipped' metadata is not JSON."""
    index = tmp_path / "index.json"
    index.write_text('{"version": "1", oops')
    with pytest.raises(ValueError, match="index.json: not valid JSON .*delete it and rerun"):
        LatentCache(str(tmp_path))
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        cache_latents(folder[0], str(tmp_path), vae_file, SIZE, shard_size=2)
    assert index.read_text() == '{"version": "1", oops' and os.listdir(tmp_path) == ["index.json"]
    save_file({"labels": torch.zeros(1)}, shard_path(str(tmp_path), 0), {"skipped": "[oops"})
    with pytest.raises(ValueError, match="shard_00000.safetensors: its 'skipped' metadata"):
        shard_skipped(str(tmp_path), 0)


def test_train_gen_on_latent_cache(folder, vae_file, tmp_path):
    """train.py --stage gen --data latents: the S2 latent generator (32x32x4) trains 2 steps on
    a cache of 64-pixel crops (the tiny VAE halves once), with a random 4-channel MAE."""
    from encoder import MAEConfig, MAEResNet
    from checkpoint import save_checkpoint
    from sample import load_checkpoint
    import train
    out = str(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache_latents(folder[0], out, vae_file, 64, shard_size=4, workers=1)
    torch.manual_seed(0)
    mae = MAEResNet(MAEConfig(in_channels=4, base_channels=8, layers=(1, 1, 1, 1)),
                    with_heads=False)
    save_checkpoint(mae, str(tmp_path / "mae.safetensors"), kind="mae")
    run = str(tmp_path / "run")
    train.main(["--stage", "gen", "--model", "S2", "--data", "latents", "--data-path", out,
                "--mae-ckpt", str(tmp_path / "mae.safetensors"), "--out", run, "--steps", "2",
                "--n-classes-per-step", "2", "--gen-per-label", "4", "--n-pos", "3",
                "--n-unc", "2", "--warmup", "1", "--device", "cpu", "--log-every", "1"])
    assert load_checkpoint(run).cfg.in_channels == 4
    with pytest.raises(ValueError, match=r"holds \(4, 16, 16\) samples"):   # 32-pixel crops
        small = str(tmp_path / "small")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache_latents(folder[0], small, vae_file, SIZE, shard_size=4, workers=1)
        train.main(["--stage", "gen", "--model", "S2", "--data", "latents", "--data-path", small,
                    "--mae-ckpt", str(tmp_path / "mae.safetensors"), "--out", run + "2",
                    "--steps", "1", "--device", "cpu"])
