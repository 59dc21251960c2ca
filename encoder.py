"""
The feature encoders phi of Drifting Models: a ResNet trained as a masked autoencoder (MAE) on
SD-VAE latents or patchified pixels, and the feature groups the drift loss compares.

Paper: Generative Modeling via Drifting, Deng, Li, Li, Du, He, arXiv:2602.04770 (v2); App. A.3
(the MAE), A.4 (the pixel MAE), A.5 (the feature groups). Official code:
github.com/lambertae/drifting @ accd0cf, models/mae_model.py (MAEResNetJAX, activation_fn) and
configs/{mae,gen}/*.yaml; golden parity in tests/test_encoder.py.

- `MAEResNet(cfg)`: ResNet encoder (basic blocks, GroupNorm), U-Net decoder, class head.
  `model.mae_loss(x, labels, lam, generator)` is the pretraining objective (also `model(...)`).
  Pixel MAEs (`pixel_640`) space-to-depth 8x8 patches first: 256x256x3 -> 32x32x192.
- `feature_groups(model, x)`: dict name -> (B, T, D), the official drift-loss features:
  `global` (raw x), `norm_x`, and 7 groups per map for 12 maps (86 groups at paper size).
- `mae_from_state(config, state_dict)`: an MAEResNet from our weights file. The released flax
  artifacts load through convert.py (`mae_from_official`); ConvNeXt-V2 and the 99 groups of
  pixel models are in convnext.py.

Demo: python encoder.py      (presets with parameter counts, the groups of the tiny preset
                              and one MAE loss)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shapes: B batch; C channels and H x W grid of the encoder input AFTER input patching
#         (32 x 32 x 4 for latents, 32 x 32 x 192 for 8x8-patched 256px images); C_img, p the
#         image channels and input patch side (C = p*p*C_img); D channels and h x w grid of a
#         feature map (D in C_0, 2C_0, 4C_0, 8C_0, with C_0 = base_channels); s side of a
#         pooling patch; T tokens (locations) of a feature group; K classes.
# Public layout is NCHW (PyTorch); the official code and the golden files are NHWC.

GN_EPS = 1e-6        # flax GroupNorm epsilon; PyTorch's default 1e-5 breaks golden parity
GN_MAX_GROUPS = 32
STD_EPS = 1e-6       # official safe_std: sqrt(var + 1e-6); norm_x uses the same 1e-6
MASK_RATIO = 0.5     # configs/mae/*.yaml: mask_ratio_min = mask_ratio_max = 0.5
# The activation_kwargs of every configs/gen/*.yaml (App. A.5: groups a-d).
ACTIVATION_KWARGS = dict(patch_mean_size=(2, 4), patch_std_size=(2, 4), use_mean=True,
                         use_std=True, every_k_block=2)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------
def gn_groups(channels, max_groups=GN_MAX_GROUPS):
    """Official `_choose_gn_groups`: the largest g <= max_groups dividing channels.
    640 -> 32 groups of 20; 16 -> 16 groups of 1 (the golden tiny model)."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def group_norm(channels, groups=None):
    return nn.GroupNorm(groups or gn_groups(channels), channels, eps=GN_EPS)


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(shortcut(x) + GN(conv(relu(GN(conv(x)))))). Module names are the
    official ones (conv1, gn1, conv2, gn2, proj_conv, proj_gn) so weights map by name."""

    def __init__(self, c_in, c_out, stride=1, dropout=0.0):
        super().__init__()
        self.conv1, self.gn1 = conv3x3(c_in, c_out, stride), group_norm(c_out)
        self.conv2, self.gn2 = conv3x3(c_out, c_out), group_norm(c_out)
        self.dropout = dropout
        # Official: projection iff the residual's shape differs (first block of stages 2-4).
        self.has_proj = stride != 1 or c_in != c_out
        if self.has_proj:
            # 1x1 stride-2 conv; flax 'SAME' padding is zero padding for k = 1
            self.proj_conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.proj_gn = group_norm(c_out)

    def forward(self, x, train=False):                         # x (B, D_in, h_in, w_in)
        y = F.relu(self.gn1(self.conv1(x)))                     # (B, D, h, w)
        y = F.dropout(y, self.dropout, training=train)          # dropout_prob is 0 in configs
        y = self.gn2(self.conv2(y))                             # (B, D, h, w)
        if self.has_proj:
            x = self.proj_gn(self.proj_conv(x))                 # (B, D, h, w)
        return F.relu(x + y)                                    # (B, D, h, w)


class ConvGNReLU(nn.Sequential):
    """Official decoder unit `_ConvGNReLU`: 3x3 conv (no bias) -> GN -> ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv, self.gn, self.act = conv3x3(c_in, c_out), group_norm(c_out), nn.ReLU()


# ------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------
class ResNetEncoder(nn.Module):
    """Stem (3x3 conv, GN, ReLU) and 4 stages of basic blocks, widths C_0 * (1, 2, 4, 8), stride
    2 in the first block of stages 2-4; each stage ends with its own GroupNorm `layer{i}_norm`
    IN the main path (the next stage sees normalized input). ResNet-34 layout at [3, 4, 6, 3]."""

    def __init__(self, in_channels, base_channels, layers, dropout=0.0):
        super().__init__()
        self.conv1 = conv3x3(in_channels, base_channels)
        self.gn1 = group_norm(base_channels)
        self.stages = nn.ModuleList()
        c_in = base_channels
        for i, n_blocks in enumerate(layers):
            c_out = base_channels * 2 ** i
            self.stages.append(nn.ModuleList(
                BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i > 0 and j == 0 else 1,
                           dropout) for j in range(n_blocks)))
            setattr(self, f"layer{i + 1}_norm", group_norm(c_out))
            c_in = c_out

    def forward(self, x, train=False):
        """x (B, C, H, W), already patched -> (maps, blocks). maps: conv1 and layer1..4 (after
        the stage norm), name -> (B, D, h, w); blocks: layer name -> raw block outputs."""
        x = F.relu(self.gn1(self.conv1(x)))                     # (B, C_0, H, W)
        maps, blocks = {"conv1": x}, {}
        for i, stage in enumerate(self.stages):
            name = f"layer{i + 1}"
            blocks[name] = []
            for block in stage:
                x = block(x, train)                             # (B, D, h, w)
                blocks[name].append(x)
            x = getattr(self, f"{name}_norm")(x)                # (B, D, h, w)
            maps[name] = x
        return maps, blocks


# ------------------------------------------------------------------------------------------
# Decoder and class head (MAE pretraining only; the drift loss uses the encoder alone)
# ------------------------------------------------------------------------------------------
class UpBlock(nn.Module):
    """Official `_UpBlock`: bilinear resize to the skip's grid, concat [x, skip], GN, 2 convs."""

    def __init__(self, c_in, c_skip, c_out):
        super().__init__()
        # Officially a fixed 32 groups here, not gn_groups(): c_in + c_skip must divide by 32,
        # so the full model needs base_channels % 32 == 0 (the golden C_0 = 16 is encoder-only).
        self.concat_norm_fn = group_norm(c_in + c_skip, groups=GN_MAX_GROUPS)
        self.proj, self.refine = ConvGNReLU(c_in + c_skip, c_out), ConvGNReLU(c_out, c_out)

    def forward(self, x, skip):                         # (B, c_in, h, w), (B, c_skip, 2h, 2w)
        # jax.image.resize(bilinear) upsampling = half-pixel bilinear with edge clamping
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, skip], dim=1)                         # (B, c_in + c_skip, 2h, 2w)
        return self.refine(self.proj(self.concat_norm_fn(x)))  # (B, c_out, 2h, 2w)


class UNetDecoder(nn.Module):
    """Official `_UNetDecoder`: bridge on layer4, up-blocks joining layer3, 2, 1 and the stem,
    then a 1x1 conv (with bias) to the patched input's C channels."""

    def __init__(self, base_channels, out_channels):
        super().__init__()
        c = base_channels
        self.bridge = ConvGNReLU(8 * c, 8 * c)
        self.up43, self.up32 = UpBlock(8 * c, 4 * c, 4 * c), UpBlock(4 * c, 2 * c, 2 * c)
        self.up21, self.up10 = UpBlock(2 * c, c, c), UpBlock(c, c, c)
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, maps):
        x = self.bridge(maps["layer4"])                         # (B, 8C_0, H/8, W/8)
        x = self.up43(x, maps["layer3"])                        # (B, 4C_0, H/4, W/4)
        x = self.up32(x, maps["layer2"])                        # (B, 2C_0, H/2, W/2)
        x = self.up21(x, maps["layer1"])                        # (B, C_0, H, W)
        x = self.up10(x, maps["conv1"])                         # (B, C_0, H, W)
        return self.head(x)                                     # (B, C, H, W)


# ------------------------------------------------------------------------------------------
# The model and the MAE objective (App. A.3)
# ------------------------------------------------------------------------------------------
@dataclass
class MAEConfig:
    """Field names are the official `model_config` keys, so MAEConfig(**metadata) works."""
    in_channels: int = 4          # C_img: 4 for SD-VAE latents, 3 for pixels
    base_channels: int = 640      # C_0: 256 (ablation) or 640 (final)
    layers: tuple = (3, 4, 6, 3)  # basic blocks per stage
    input_patch_size: int = 1     # p: space-to-depth before the stem (8 for 256px pixels)
    patch_size: int = 2           # side of a MASKING unit on the patched grid (official name)
    num_classes: int = 1000       # class head, for the cls fine-tune
    dropout_prob: float = 0.0
    # NOTE: officially use_bf16 makes every layer compute in bf16; here it is only recorded
    # (metadata round trip) and the caller chooses precision with torch.autocast.
    use_bf16: bool = False


def patchify(x, p):
    """Official `patch_input`, space-to-depth in NCHW: (B, C_img, pH, pW) -> (B, p*p*C_img, H, W).
    Channel (i*p + j)*C_img + c holds pixel (i, j) of the patch, channel c: the official
    'b (h i) (w j) c -> b h w (i j c)'. NOTE: F.pixel_unshuffle orders (c, i, j) instead."""
    if p == 1:
        return x
    B, C_img, pH, pW = x.shape
    x = x.reshape(B, C_img, pH // p, p, pW // p, p)             # (B, C_img, H, p, W, p)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(B, p * p * C_img, pH // p, pW // p)


def unpatchify(x, p):
    """Inverse of patchify: (B, p*p*C_img, H, W) -> (B, C_img, pH, pW), e.g. to view recons."""
    if p == 1:
        return x
    B, C, H, W = x.shape
    x = x.reshape(B, p, p, C // (p * p), H, W)                 # (B, p, p, C_img, H, W)
    return x.permute(0, 3, 4, 1, 5, 2).reshape(B, C // (p * p), H * p, W * p)


def patch_mask(B, H, W, unit=2, ratio=MASK_RATIO, generator=None, device=None):
    """Official `make_patch_mask`: (B, 1, H, W), 1 = masked (zeroed), constant on unit x unit
    blocks, each block masked independently with probability `ratio`. The generator must live
    on `device`. NOTE: officially the ratio is drawn per sample from U[min, max]; every config
    sets min = max = 0.5, so we take one number."""
    assert H % unit == 0 and W % unit == 0, f"grid {H}x{W} not divisible by mask unit {unit}"
    noise = torch.rand(B, 1, H // unit, W // unit, generator=generator, device=device)
    mask = (noise < ratio).float()                              # (B, 1, H/unit, W/unit)
    return mask.repeat_interleave(unit, 2).repeat_interleave(unit, 3)   # (B, 1, H, W)


def masked_l2(recon, target, mask):
    """Official recon loss, per sample: squared error on masked units / number of masked
    LOCATIONS. The mask is (B, 1, H, W), so the denominator does not count channels: the loss is
    C x the per-element mean (lr 4e-3, clip 2.0 and lambda = 0.1 were tuned with this scale)."""
    se = (recon.float() - target.float()) ** 2                  # (B, C, H, W)
    return (se * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) + 1e-8)  # (B,)


def _flax_init_(module):
    """flax defaults: kernels lecun_normal (truncated normal, variance 1/fan_in), zero biases,
    GroupNorm weight 1 and bias 0. NOTE: PyTorch's conv default is uniform with variance
    1/(3 fan_in); we start MAE pretraining from the official init instead."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        std = module.weight[0].numel() ** -0.5 / 0.87962566103423978   # undo the truncation
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MAEResNet(nn.Module):
    """The latent-MAE ResNet of App. A.3. with_heads=False builds the encoder alone: all that
    the drift loss needs (at C_0 = 640 the decoder and head add another 0.56B parameters)."""

    def __init__(self, cfg: MAEConfig, with_heads=True):
        super().__init__()
        self.cfg = cfg
        C = cfg.in_channels * cfg.input_patch_size ** 2
        self.encoder = ResNetEncoder(C, cfg.base_channels, cfg.layers, cfg.dropout_prob)
        self.with_heads = with_heads
        if with_heads:
            self.decoder = UNetDecoder(cfg.base_channels, C)
            self.fc = nn.Linear(cfg.base_channels * 2 ** (len(cfg.layers) - 1), cfg.num_classes)
        self.apply(_flax_init_)

    def forward(self, *args, **kwargs):
        # DDP synchronizes gradients only for calls through forward(), so train.py calls model(...)
        return self.mae_loss(*args, **kwargs)

    def mae_loss(self, x, labels=None, lam=0.0, generator=None, mask_ratio=MASK_RATIO):
        """x (B, C_img, pH, pW) -> (loss, info): lam * CE + (1 - lam) * masked L2 (App. A.3),
        averaged over the batch. lam > 0 only in the cls fine-tune (its schedule is train.py's).
        With labels=None the class head is skipped (lam must be 0); pass labels under DDP so
        that fc always gets a gradient. info holds batch means (detached)."""
        assert self.with_heads, "mae_loss needs the decoder: build MAEResNet(cfg, with_heads=True)"
        x = patchify(x, self.cfg.input_patch_size)              # (B, C, H, W)
        B, _, H, W = x.shape
        mask = patch_mask(B, H, W, self.cfg.patch_size, mask_ratio, generator, x.device)
        maps, _ = self.encoder(x * (1 - mask.to(x.dtype)), self.training)
        recon = self.decoder(maps)                              # (B, C, H, W)
        rec = masked_l2(recon, x, mask)                         # (B,)
        info = {"recon_loss": rec, "mask_ratio": mask.mean((1, 2, 3))}
        loss = rec
        if labels is not None:
            logits = self.fc(maps["layer4"].mean((2, 3)))       # (B, K) global average pool
            ce = F.cross_entropy(logits.float(), labels, reduction="none")    # (B,)
            loss = lam * ce + (1 - lam) * rec                   # (B,)
            info.update(cls_loss=ce, accuracy=(logits.argmax(-1) == labels).float())
        elif lam != 0:
            raise ValueError("lam > 0 needs labels")
        return loss.mean(), {k: v.detach().mean() for k, v in info.items()}


def mae_from_state(config, state_dict, encoder_only=False):
    """Our weights file (checkpoint.read_checkpoint(path, "mae") gives config and state_dict) ->
    MAEResNet in eval mode; the decoder and head are built only if the file has them. Tensors
    that do not fit the config (another MAE's weights) raise a ValueError naming them."""
    if encoder_only:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("encoder.")}
    heads = any(k.startswith("decoder.") for k in state_dict)
    hint = "pass the --mae-ckpt made for this --mae-model / data"
    try:
        with torch.device("meta"):                              # every tensor comes from
            model = MAEResNet(MAEConfig(**config), with_heads=heads)   # the file: no init work
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"MAE config {config} builds no MAEResNet ({e}); {hint}") from e
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} (the config's: {tuple(own[k].shape)})"
           for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    bad += [f"unexpected {k}" for k in state_dict if k not in own]
    bad += [f"missing {k}" for k in own if k not in state_dict]
    if bad:
        raise ValueError(f"MAE weights do not fit their config {config}: {', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; {hint}")
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


@torch.no_grad()
def mae_reconstruct(model, x, generator):
    """x (B, C_img, pH, pW) -> patched input, reconstruction and mask (1 = masked), each
    (B, C, H, W): the masking of mae_loss, returning tensors."""
    x = patchify(x, model.cfg.input_patch_size)                 # (B, C, H, W)
    B, C, H, W = x.shape
    mask = patch_mask(B, H, W, model.cfg.patch_size, generator=generator, device=x.device)
    recon = model.decoder(model.encoder(x * (1 - mask))[0])     # (B, C, H, W)
    return x, recon, mask.expand(B, C, H, W)


@torch.no_grad()
def mae_eval(model, x, mean_image, seed=10_001):
    """Masked L2 of the model's reconstruction of x, and of the per-pixel mean image on the
    same (seeded) masks: the trivial baseline a useful MAE must beat."""
    xp, recon, mask = mae_reconstruct(model, x, torch.Generator(x.device).manual_seed(seed))
    mean = patchify(mean_image.expand_as(x), model.cfg.input_patch_size)   # (B, C, H, W)
    return (masked_l2(recon, xp, mask[:, :1]).mean().item(),
            masked_l2(mean, xp, mask[:, :1]).mean().item())


@torch.no_grad()
def mae_picture(model, x, seed=1):
    """Rows masked input (masked = 0), reconstruction (visible pixels kept), original of x
    (B, C_img, pH, pW) -> (3B, C_img, pH, pW), in x's range."""
    xp, recon, mask = mae_reconstruct(model, x, torch.Generator(x.device).manual_seed(seed))
    xp, recon, mask = (unpatchify(t, model.cfg.input_patch_size) for t in (xp, recon, mask))
    return torch.cat([xp * (1 - mask), xp * (1 - mask) + recon * mask, xp])


# ------------------------------------------------------------------------------------------
# Feature groups for the drift loss (App. A.5; official get_activations + activation_fn)
# ------------------------------------------------------------------------------------------
def safe_std(x, dim):
    """Official safe_std: sqrt(biased var + 1e-6), in float32."""
    x = x.float()
    return (((x - x.mean(dim, keepdim=True)) ** 2).mean(dim) + STD_EPS).sqrt()


def _patches(f, s):
    """(B, D, h, w) -> (B, T, s*s, D), T = (h/s)(w/s) row-major s x s patches (official order)."""
    B, D, h, w = f.shape
    f = f.reshape(B, D, h // s, s, w // s, s)                   # (B, D, h/s, s, w/s, s)
    return f.permute(0, 2, 4, 3, 5, 1).reshape(B, (h // s) * (w // s), s * s, D)


def _map_groups(out, name, f, patch_mean_size, patch_std_size, use_mean, use_std):
    """The 7 groups of one map f (B, D, h, w), in official order: (a) per-location vectors,
    (b) global mean / std, (c, d) s x s patch means, then patch stds (skipped if s !| h, w)."""
    B, D, h, w = f.shape
    out[name] = f.flatten(2).transpose(1, 2)                    # (B, h*w, D) tokens row-major
    if use_mean:
        out[f"{name}_mean"] = f.mean((2, 3))[:, None]           # (B, 1, D)
    if use_std:
        out[f"{name}_std"] = safe_std(f.flatten(2), -1)[:, None]  # (B, 1, D)
    for s in patch_mean_size:
        if h % s == 0 and w % s == 0:
            out[f"{name}_mean_{s}"] = _patches(f, s).mean(2)    # (B, h*w/s^2, D)
    for s in patch_std_size:
        if h % s == 0 and w % s == 0:
            out[f"{name}_std_{s}"] = safe_std(_patches(f, s), 2)  # (B, h*w/s^2, D)


def feature_groups(model, x, patch_mean_size=(2, 4), patch_std_size=(2, 4), use_mean=True,
                   use_std=True, every_k_block=2):
    """x (B, C_img, pH, pW) -> dict name -> (B, T, D), the official activation_fn output in its
    order: global, norm_x, then conv1, layer1..4 (after their norms), then the raw output of
    every k-th block of each stage (`layer{i}_blk{k}`), each map expanded by _map_groups.
    Defaults = ACTIVATION_KWARGS. Differentiable in x (generated samples need the gradient);
    call under torch.no_grad() for real samples. The encoder runs in eval mode (no dropout)."""
    B = x.shape[0]
    # `global` = the raw sample flattened (the "no phi" loss); NHWC order as official, so the
    # vectors match the golden files (the drift loss itself is invariant to the order).
    out = {"global": x.permute(0, 2, 3, 1).reshape(B, 1, -1)}   # (B, 1, pH*pW*C_img)
    x = patchify(x, model.cfg.input_patch_size)                 # (B, C, H, W)
    # norm_x: per-channel RMS of the encoder input (the paper says "mean of squared values")
    out["norm_x"] = (x.float().pow(2).mean((2, 3)) + STD_EPS).sqrt()[:, None]   # (B, 1, C)
    maps, blocks = model.encoder(x.to(next(model.parameters()).dtype), train=False)  # bf16 phi
    kw = dict(patch_mean_size=patch_mean_size, patch_std_size=patch_std_size,
              use_mean=use_mean, use_std=use_std)
    for name, f in maps.items():
        _map_groups(out, name, f, **kw)
    if every_k_block:                                           # None / 0: no block groups
        for name, outs in blocks.items():
            for k, f in enumerate(outs, start=1):
                if k % every_k_block == 0:
                    _map_groups(out, f"{name}_blk{k}", f, **kw)
    return out


# ------------------------------------------------------------------------------------------
# Presets (official configs/mae/*.yaml; parameter counts with heads, measured by a test)
# ------------------------------------------------------------------------------------------
_PAPER = dict(layers=(3, 4, 6, 3), patch_size=2, num_classes=1000, dropout_prob=0.0,
              use_bf16=True)
_MNIST = dict(in_channels=1, base_channels=32, layers=(1, 1, 1, 1), patch_size=2, num_classes=10,
              dropout_prob=0.0, use_bf16=False)
MAE_models = {
    "latent_256": dict(in_channels=4, base_channels=256, input_patch_size=1, **_PAPER),
    # ^ 431.35M params (encoder 340.22M): ablation MAE, configs/mae/latent_ablation_256.yaml
    "latent_640": dict(in_channels=4, base_channels=640, input_patch_size=1, **_PAPER),
    # ^ 2687.87M params (encoder 2126.04M): configs/mae/latent_640.yaml
    "pixel_640": dict(in_channels=3, base_channels=640, input_patch_size=8, **_PAPER),
    # ^ 2689.07M params (encoder 2127.12M): configs/mae/pixel_640.yaml, 8x8 patches
    "tiny": dict(in_channels=4, base_channels=32, layers=(2, 2, 2, 2), input_patch_size=1,
                 patch_size=2, num_classes=10, dropout_prob=0.0, use_bf16=False),
    # ^ 4.19M params (encoder 2.80M): CPU tests and demos; C_0 = 32 is the decoder's minimum
    "mnist": dict(input_patch_size=2, **_MNIST),
    # ^ 2.62M params (encoder 1.23M): the CPU MAE run on MNIST-5k seen as 2x2 patches (28x28x1
    # -> 14x14x4), as pixel_640 sees 8x8 ones: the finest feature map is a patch grid (README,
    # MNIST in 15 minutes: per-pixel features gave speckle and FID 103, these 35.78)
    "mnist_pixel": dict(input_patch_size=1, **_MNIST),
    # ^ 2.62M params (encoder 1.23M): the mnist MAE on single pixels (the preset until
    # 2026-12-03), kept for the README's comparison and the MNIST ablation rows made with it
    "pixel_tiny": dict(in_channels=3, base_channels=32, layers=(1, 1, 1, 1), input_patch_size=8,
                       patch_size=2, num_classes=10, dropout_prob=0.0, use_bf16=False),
    # ^ 2.69M params (encoder 1.28M): pixel_640's 8x8 patching at CPU size (64px -> 8x8x192)
}


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    for name, preset in MAE_models.items():
        with torch.device("meta"):                              # no memory, no init cost
            m = MAEResNet(MAEConfig(**preset))
        print(f"{name:>10}: {count_params(m) / 1e6:7.2f}M params "
              f"(encoder {count_params(m.encoder) / 1e6:.2f}M)  {preset}")
    model = MAEResNet(MAEConfig(**MAE_models["tiny"])).eval()
    x = torch.randn(2, 4, 32, 32)
    groups = feature_groups(model, x, **ACTIVATION_KWARGS)
    print(f"tiny on {tuple(x.shape)}: {len(groups)} feature groups")
    for name, f in groups.items():
        print(f"  {name:<20} {tuple(f.shape)}")
    loss, info = model.train().mae_loss(x, torch.tensor([1, 2]), lam=0.1,
                                        generator=torch.Generator().manual_seed(0))
    print(f"mae_loss {loss.item():.4f}", {k: round(v.item(), 4) for k, v in info.items()})
