"""
SD-VAE: the KL autoencoder of Latent Diffusion (Rombach et al., arXiv:2112.10752) in plain
PyTorch, the image <-> latent map of the latent Drifting Models (arXiv:2602.04770 v2, Sec. 4:
256x256x3 images <-> 32x32x4 latents x VAE_SCALE). `load_vae` reads the public diffusers-format
weights of stabilityai/sd-vae-ft-mse (the official Drifting code's choice) or sd-vae-ft-ema, the
file `diffusion_pytorch_model.safetensors` (335 MB) that the user downloads from the Hugging Face
Hub; nothing is fetched at run time. Float32 parity with diffusers.AutoencoderKL is tested.
`vae.encode` maps images in [-1, 1] to latents x VAE_SCALE, `vae.decode` maps them back.

Demo: python vae.py                               # random SD-VAE: shapes, parameter count
      python vae.py --weights W [--image I.png]   # round trip of I (or a random image): PSNR
"""
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# Shapes: B batch; H, W image size; C channels of a feature map (one of cfg.channels);
#         h, w feature-map size; Z latent channels (4); L = h * w tokens of the mid attention.

VAE_SCALE = 0.18215          # SD-VAE latent std normalizer (LDM): latents = sample * VAE_SCALE
GN_EPS = 1e-6                # every GroupNorm of the SD-VAE (PyTorch's default 1e-5 is wrong)
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
HINT = (f"download {WEIGHTS_FILE} of stabilityai/sd-vae-ft-mse (Hugging Face Hub) and pass its "
        f"path (or its folder)")


@dataclass
class VAEConfig:
    channels: tuple = (128, 256, 512, 512)  # block_out_channels: stage i works at 1/2^i size
    layers_per_block: int = 2                # ResBlocks per encoder stage (decoder: one more)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4                 # Z
    norm_groups: int = 32                    # norm_num_groups (not in the weights: see load_vae)


VAE_models = {
    "SD": dict(channels=(128, 256, 512, 512), layers_per_block=2),  # 83.65M: sd-vae-ft-mse/ema
    "tiny": dict(channels=(32, 64), layers_per_block=1),            # 0.66M: tests and CPU demos
}


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------
class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32, returned in the input dtype (ADM's GroupNorm32): a group
    pools up to 262k values at 256px, too many for bf16 statistics. CUDA autocast already runs
    group_norm in float32; this also covers a VAE cast to bf16 with .to()."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def norm(C, groups):
    return GroupNorm(groups, C, eps=GN_EPS)


class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))))); skip is a 1x1 conv iff the width changes.
    diffusers' ResnetBlock2D without the time embedding (and dropout 0)."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):                                        # x (B, C_in, h, w)
        y = self.conv1(F.silu(self.norm1(x)))                    # (B, C, h, w)
        y = self.conv2(F.silu(self.norm2(y)))                    # (B, C, h, w)
        return self.skip(x) + y                                  # (B, C, h, w)


class Attention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v) over the h*w positions: one head of width C.
    Always float32 with autocast off: it runs once per network, at the lowest resolution (32x32
    for 256px images), so it is cheap, and bf16 logits of 512-d dot products are coarse."""

    def __init__(self, C, groups):
        super().__init__()
        self.norm = norm(C, groups)
        self.q, self.k, self.v, self.proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):                                        # x (B, C, h, w)
        h = x.shape[2]
        with torch.autocast(x.device.type, enabled=False):
            t = rearrange(self.norm(x).float(), "b c h w -> b (h w) c")          # (B, L, C)
            q, k, v = (F.linear(t, m.weight.float(), m.bias.float())
                       for m in (self.q, self.k, self.v))                        # (B, L, C) each
            a = F.scaled_dot_product_attention(q, k, v)                          # (B, L, C)
            a = F.linear(a, self.proj.weight.float(), self.proj.bias.float())    # (B, L, C)
        return x + rearrange(a, "b (h w) c -> b c h w", h=h).to(x.dtype)         # (B, C, h, w)


class MidBlock(nn.Sequential):
    """ResBlock -> Attention -> ResBlock at the lowest resolution (diffusers UNetMidBlock2D)."""

    def __init__(self, C, groups):
        super().__init__(OrderedDict(res1=ResBlock(C, C, groups), attn=Attention(C, groups),
                                     res2=ResBlock(C, C, groups)))


class Stage(nn.Module):
    """n ResBlocks, then an optional 2x down- or up-sampling conv (diffusers DownEncoderBlock2D /
    UpDecoderBlock2D)."""

    def __init__(self, c_in, c_out, n, groups, resample=None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out, groups)
                                    for j in range(n))
        self.mode = resample  # "down", "up" or None (the last stage of each network)
        if resample:
            self.resample = nn.Conv2d(c_out, c_out, 3, stride=2 if resample == "down" else 1,
                                      padding=int(resample == "up"))

    def forward(self, x):                                        # x (B, C_in, h, w)
        for block in self.blocks:
            x = block(x)                                         # (B, C, h, w)
        if self.mode == "down":
            # NOTE: LDM pads only right and bottom, then a stride-2 3x3 conv with no padding
            # (the original TF-port quirk); symmetric padding would shift the grid by a pixel.
            x = self.resample(F.pad(x, (0, 1, 0, 1)))            # (B, C, h/2, w/2)
        elif self.mode == "up":
            x = self.resample(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B,C,2h,2w)
        return x


# ------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder
# ------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2Z, H/8, W/8): [mean | logvar] before quant_conv."""

    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.stages = nn.ModuleList(Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                          "down" if i < n - 1 else None) for i in range(n))
        self.mid = MidBlock(ch[-1], g)
        self.norm_out = norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                                      # (B, C_0, H, W)
        for stage in self.stages:
            x = stage(x)                                         # down to (B, C_last, h, w)
        x = self.mid(x)                                          # (B, C_last, h, w)
        return self.conv_out(F.silu(self.norm_out(x)))           # (B, 2Z, h, w)


class Decoder(nn.Module):
    """Latent (B, Z, h, w) -> image (B, 3, 8h, 8w); stages in reverse width order."""

    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.channels[::-1], cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], g)
        self.stages = nn.ModuleList(Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                                          "up" if i < n - 1 else None) for i in range(n))
        self.norm_out = norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))                            # (B, C_last, h, w)
        for stage in self.stages:
            x = stage(x)                                         # up to (B, C_0, H, W)
        return self.conv_out(F.silu(self.norm_out(x)))           # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """The SD-VAE with a diagonal Gaussian posterior. encode/decode take and return float32
    whatever the weights' dtype; under torch.autocast (bf16) the convolutions run in bf16 while
    GroupNorm, attention and the posterior stay float32. NOTE: bf16 encode/decode quality is
    unmeasured (no GPU in this project's CI); sample.py decodes in float32."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, Z = cfg, cfg.latent_channels
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1)
        self.post_quant_conv = nn.Conv2d(Z, Z, 1)

    @torch.no_grad()
    def posterior(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> (mean, std) of q(z|x), each (B, Z, h, w), unscaled."""
        dtype = self.quant_conv.weight.dtype
        moments = self.quant_conv(self.encoder(x.to(dtype))).float()           # (B, 2Z, h, w)
        mean, logvar = moments.chunk(2, dim=1)                                  # (B, Z, h, w)
        return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))

    @torch.no_grad()
    def encode(self, x, generator=None, sample=True):
        """Images in [-1, 1] -> latents x VAE_SCALE (B, Z, h, w): a posterior sample (noise from
        `generator`, drawn on its device: a CPU generator gives the same latents on any device),
        or the mean when sample=False."""
        mean, std = self.posterior(x)                                           # (B, Z, h, w)
        if sample:
            eps = torch.randn(mean.shape, generator=generator,
                              device=generator.device if generator else mean.device)
            mean = mean + std * eps.to(mean.device)                             # (B, Z, h, w)
        return mean * VAE_SCALE

    def decode(self, z, grad=False):
        """Latents x VAE_SCALE (B, Z, h, w) -> images (B, 3, 8h, 8w), float32, about [-1, 1].
        No autograd graph unless grad=True (the decoder inside a pixel-space feature loss)."""
        with torch.set_grad_enabled(grad):
            dtype = self.post_quant_conv.weight.dtype
            z = self.post_quant_conv((z.float() / VAE_SCALE).to(dtype))        # (B, Z, h, w)
            return self.decoder(z).float()                                      # (B, 3, H, W)


# ------------------------------------------------------------------------------------------
# Loading the diffusers-format weights
# ------------------------------------------------------------------------------------------
# diffusers key -> ours, applied in order to every key of the file. The attention projections
# come under two names: to_q/to_k/to_v/to_out.0 (current diffusers) and query/key/value/proj_attn
# (files written by older diffusers, which current diffusers renames on load too).
RENAME = [
    (r"\.(down|up)_blocks\.(\d+)\.resnets\.", r".stages.\2.blocks."),
    (r"\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.", r".stages.\2.resample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.res1."), (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn."),
    (r"\.group_norm\.", ".norm."),
    (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."), (r"\.(to_v|value)\.", ".v."),
    (r"\.(to_out\.0|proj_attn)\.", ".proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def ours(key):
    for pattern, repl in RENAME:
        key = re.sub(pattern, repl, key)
    return key


def config_from_weights(sd):
    """The widths and depths of an SD-VAE-architecture state_dict (diffusers names). The group
    count is not in the weights: 32, as every SD / SDXL VAE."""
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    layers = 1 + max(int(m[1]) for k in sd
                     if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    channels = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                     for i in range(n))
    return VAEConfig(channels, layers, sd["encoder.conv_in.weight"].shape[1],
                     sd["decoder.conv_out.weight"].shape[0], sd["post_quant_conv.weight"].shape[0])


def load_vae(path, device=None, config=None):
    """diffusion_pytorch_model.safetensors of an SD-VAE (or its folder) -> frozen float32
    AutoencoderKL on `device` (default CPU). `config`: a dict of VAEConfig fields (e.g. a
    VAE_models entry); None infers it from the weights' shapes. Every key and shape is checked."""
    from safetensors.torch import load_file  # lazy: the model itself needs only torch
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such SD-VAE weights file; {HINT}")
    try:
        sd = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); {HINT}") from e
    try:
        cfg = VAEConfig(**config) if config else config_from_weights(sd)
    except (KeyError, ValueError) as e:  # no such key, or max() of nothing: no encoder blocks
        raise ValueError(f"{path}: not an SD-VAE diffusers checkpoint (no {e}); {HINT}") from e
    with torch.device("meta"):  # no init work: every tensor comes from the file
        model = AutoencoderKL(cfg)
    want, got = model.state_dict(), {}
    for k, v in sd.items():
        name = ours(k)
        if name in got:
            raise ValueError(f"{path}: keys {got[name][0]!r} and {k!r} are the same weight")
        got[name] = (k, v)
    problems = [f"unexpected key {k!r}" for n, (k, _) in got.items() if n not in want]
    problems += [f"missing key {n!r} (vae.py name)" for n in want if n not in got]
    problems += [f"key {k!r} has shape {tuple(v.shape)}, expected {tuple(want[n].shape)}"
                 for n, (k, v) in got.items() if n in want and v.shape != want[n].shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path}: not an SD-VAE diffusers checkpoint of {cfg}: "
                         f"{'; '.join(problems[:3])}{more}. {HINT}")
    model.load_state_dict({n: v.float().to(device or "cpu") for n, (_, v) in got.items()},
                          assign=True)
    return model.requires_grad_(False).eval()


if __name__ == "__main__":
    import argparse

    import numpy as np
    p = argparse.ArgumentParser(description="SD-VAE demo: parameter count, round trip, PSNR")
    p.add_argument("--weights", help="diffusion_pytorch_model.safetensors (default: random SD-VAE)")
    p.add_argument("--image", help="image file to round-trip (default: a random image)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for name, preset in VAE_models.items():
        with torch.device("meta"):  # counts without allocating
            n = sum(q.numel() for q in AutoencoderKL(VAEConfig(**preset)).parameters())
        print(f"VAE {name:4s} {n / 1e6:6.2f}M params | {preset}")
    if args.weights:
        vae = load_vae(args.weights, args.device)
    else:
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig(**VAE_models["SD"])).to(args.device).eval()
        print("random weights (no --weights): the PSNR below is meaningless")
    if args.image:
        from PIL import Image, ImageOps
        im = ImageOps.fit(Image.open(args.image).convert("RGB"), (args.size, args.size),
                          Image.BICUBIC)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()    # (1, 3, H, W)
        x = (x / 127.5 - 1).to(args.device)                                     # in [-1, 1]
    else:
        x = torch.rand(1, 3, args.size, args.size, device=args.device) * 2 - 1  # (1, 3, H, W)
    z = vae.encode(x, torch.Generator().manual_seed(0))                         # (1, 4, h, w)
    y = vae.decode(z).clamp(-1, 1)                                              # (1, 3, H, W)
    psnr = 10 * torch.log10(4 / (y - x).pow(2).mean())  # peak-to-peak 2 on [-1, 1]
    print(f"image {tuple(x.shape)} -> latents {tuple(z.shape)} (std {z.std():.3f}) -> "
          f"image {tuple(y.shape)} | PSNR {psnr:.2f} dB")
