"""Tests of vae.py: float32 parity with diffusers.AutoencoderKL (whose format the public SD-VAE
weights are in), the real SD-VAE's key set and shapes, and clear loading errors.

diffusers is a test dependency (requirements-dev.txt). Its models here are tiny and random, with
every 1-d parameter (GroupNorm scales and shifts, biases) perturbed: their ones / zeros inits
would hide a swapped norm or a dropped bias.
"""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import load_file, save_file

from checkpoint import save_checkpoint
from models import DriftDiT, DriftDiT_models
from vae import (VAE_SCALE, WEIGHTS_FILE, AutoencoderKL, VAEConfig, VAE_models, load_vae,
                 ours)

TOL = dict(rtol=1e-4, atol=1e-5)  # float32, same math in another order


def diffusers_vae(channels, layers, groups, seed=0):
    torch.manual_seed(seed)
    n = len(channels)
    ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n,
                       up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels,
                       layers_per_block=layers, latent_channels=4, norm_num_groups=groups,
                       sample_size=32)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ref.eval()


def state_dict(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny diffusers VAE saved as a bare safetensors file, and the model itself."""
    ref = diffusers_vae((32, 64), 1, 32)
    path = tmp_path_factory.mktemp("vae") / WEIGHTS_FILE
    save_file(state_dict(ref), path)
    return str(path), ref


def check_parity(vae, ref, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1                  # (B, 3, H, W)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        want_sample = post.sample(torch.Generator().manual_seed(1)) * VAE_SCALE
        z = torch.randn(post.mean.shape, generator=g)                       # unscaled latents
        want_image = ref.decode(z).sample
    mean, std = vae.posterior(x)
    torch.testing.assert_close(mean, post.mean, **TOL)
    torch.testing.assert_close(std, post.std, **TOL)
    torch.testing.assert_close(vae.encode(x, sample=False), post.mean * VAE_SCALE, **TOL)
    torch.testing.assert_close(vae.encode(x, torch.Generator().manual_seed(1)), want_sample, **TOL)
    torch.testing.assert_close(vae.decode(z * VAE_SCALE), want_image, **TOL)
    f = 2 ** (len(vae.cfg.channels) - 1)  # downsampling factor (8 for the SD-VAE)
    assert mean.shape == (2, 4, size // f, size // f) and want_image.shape == x.shape


def test_matches_diffusers_bare_file(tiny_file):
    """Posterior mean and std, the scaled posterior sample for the same generator, and the
    decoded image equal diffusers' to float32 rounding; the config is inferred from the file."""
    path, ref = tiny_file
    vae = load_vae(path)
    assert vae.cfg == VAEConfig(channels=(32, 64), layers_per_block=1)
    check_parity(vae, ref)


def test_logvar_clamp(tiny_file):
    """log-variance is clamped to [-30, 20] before std = exp(logvar / 2), as in LDM and
    diffusers: a logvar bias of +-100 gives std = exp(10) and exp(-15) exactly."""
    path, _ = tiny_file
    vae = load_vae(path)
    x = torch.zeros(1, 3, 32, 32)
    for bias, log_std in ((100.0, 10.0), (-100.0, -15.0)):
        vae.quant_conv.bias[4:] = bias
        torch.testing.assert_close(vae.posterior(x)[1], torch.full((1, 4, 16, 16), log_std).exp())


def test_matches_diffusers_save_pretrained_folder(tmp_path):
    """The folder diffusers' save_pretrained writes (config.json + the weights) loads by its
    path; 3 stages, 2 layers per block and 8 groups (an explicit config) also match."""
    ref = diffusers_vae((16, 32, 32), 2, 8, seed=1)
    ref.save_pretrained(tmp_path)
    vae = load_vae(str(tmp_path), config=dict(channels=(16, 32, 32), layers_per_block=2,
                                              norm_groups=8))
    check_parity(vae, ref)


def test_legacy_attention_names(tiny_file, tmp_path):
    """Files written by older diffusers name the attention query/key/value/proj_attn instead of
    to_q/to_k/to_v/to_out.0; both load to the same weights."""
    path, _ = tiny_file
    sd = load_file(path)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in sd.items():
        for new, name in old.items():
            k = k.replace(f".{new}.", f".{name}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, tmp_path / "legacy.safetensors")
    a, b = load_vae(path).state_dict(), load_vae(str(tmp_path / "legacy.safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd_config_keys_and_shapes_match_diffusers():
    """Every key of the real SD-VAE (sd-vae-ft-mse's config) maps one to one onto ours with the
    same shape, and the model has diffusers' 83.65M parameters. On the meta device: no memory."""
    with torch.device("meta"):
        ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4,
                           block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                           latent_channels=4, norm_num_groups=32, sample_size=256)
        vae = AutoencoderKL(VAEConfig(**VAE_models["SD"]))
    assert ref.config.scaling_factor == VAE_SCALE
    theirs, mine = ref.state_dict(), vae.state_dict()
    mapped = {ours(k): v.shape for k, v in theirs.items()}
    assert len(mapped) == len(theirs) == len(mine) == 248
    assert mapped == {k: v.shape for k, v in mine.items()}
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_loading_errors(tiny_file, tmp_path):
    """Clear errors that name the file, the key and the fix: no file, a file that is not
    safetensors, another model's weights, a wrong shape, a missing key, the wrong config."""
    path, _ = tiny_file
    with pytest.raises(FileNotFoundError, match="no such SD-VAE weights file.*sd-vae-ft-mse"):
        load_vae(str(tmp_path / "nope.safetensors"))
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_vae(str(tmp_path / "text.safetensors"))
    gen = DriftDiT.from_config({**DriftDiT_models["S2"], "depth": 1})
    save_checkpoint(gen, tmp_path / "gen.safetensors")
    with pytest.raises(ValueError, match="not an SD-VAE diffusers checkpoint.*sd-vae-ft-mse"):
        load_vae(str(tmp_path / "gen.safetensors"))

    sd = load_file(path)
    key = "decoder.mid_block.attentions.0.to_q.weight"
    save_file({**sd, key: torch.zeros(64, 32)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(64, 32\), expected \(64, 64\)"):
        load_vae(str(tmp_path / "shape.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "decoder.conv_in.bias"},
              tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="missing key 'decoder.conv_in.bias'"):
        load_vae(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint of VAEConfig\(channels=\(128, .*more\)"):
        load_vae(path, config=VAE_models["SD"])  # a tiny file is not the SD-VAE


def test_bf16_autocast_stays_close():
    """Under bf16 autocast (CPU here; the GPU path is unmeasured) encode/decode return float32
    close to the float32 result: GroupNorm, attention and the posterior run in float32."""
    vae = AutoencoderKL(VAEConfig(**VAE_models["tiny"])).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, y = vae.encode(x, sample=False), vae.decode(torch.ones(2, 4, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, y16 = vae.encode(x, sample=False), vae.decode(torch.ones(2, 4, 16, 16))
    assert z16.dtype == y16.dtype == torch.float32
    assert (z16 - z).norm() / z.norm() < 0.05 and (y16 - y).norm() / y.norm() < 0.05
