"""
ConvNeXt-V2, the second feature encoder phi of pixel-space Drifting Models: the backbone, a
loader for the public transformers-format weights, and its feature groups for the drift loss.

Paper: Generative Modeling via Drifting, Deng, Li, Li, Du, He, arXiv:2602.04770 (v2); App. A.4
(pixel encoders), A.5 (feature groups). ConvNeXt-V2: Woo et al., arXiv:2301.00808. Official
code: github.com/lambertae/drifting @ accd0cf, models/convnext.py (ConvNextBase,
get_activations) and models/mae_model.py (build_activation_function). Weights:
facebook/convnextv2-base-22k-224 (model.safetensors, transformers names); parity with
transformers.ConvNextV2Model in tests/test_convnext.py.

- `ConvNeXtV2(**ConvNeXt_models["base"])`: the backbone without the class head.
- `convnext_from_hf(path)`: ConvNeXtV2 (eval, frozen) from transformers-format safetensors.
- `convnext_feature_groups(convnext, x)`: its 13 groups; `pixel_feature_groups(mae, convnext,
  x)`: the 99 groups of a pixel generator (encoder.feature_groups' 86, then these 13).

Demo: python convnext.py     (presets with parameter counts and the groups of a pixel model at
                              paper size, on the meta device)
"""
import contextlib
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from encoder import feature_groups, safe_std

# Shapes: B batch; H x W input pixels; D_i, h_i x w_i width and grid of stage i (56^2, 28^2,
#         14^2, 7^2 at 224 px); T tokens (locations) of a feature group.
LN_EPS = 1e-6         # every ConvNeXt LayerNorm, official (the final one included, see ConvNeXtV2)
GRN_EPS = 1e-6        # official ConvNextGRN: sqrt(sum x^2 + eps) and mean + eps
FEAT_EPS = 1e-3       # official get_activations normalize(): (y - mu) / (sigma + 1e-3)
CONVNEXT_SIZE = 224   # official: jax.image.resize of every input to 224 x 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's channels_first LayerNorm)."""

    def forward(self, x):                                       # (B, D, h, w)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2) on NHWC: x + gamma * (x * N(x)) + beta, with
    N = ||x||_2 over the grid, divided by its mean over channels. NOTE: the official code takes
    sqrt(sum x^2 + 1e-6), transformers the plain norm; we follow the official code. They differ
    by 1e-6 / (2 sum x^2) relative, negligible unless a channel is ~0 on the whole grid, where
    the eps keeps the gradient finite."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))    # zero init: GRN starts as
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))     # the identity

    def forward(self, x):                                       # (B, h, w, 4D)
        g = (x.square().sum((1, 2), keepdim=True) + GRN_EPS).sqrt()   # (B, 1, 1, 4D)
        n = g / (g.mean(-1, keepdim=True) + GRN_EPS)            # (B, 1, 1, 4D)
        return self.gamma * (x * n) + self.beta + x             # (B, h, w, 4D)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4x, exact GELU, GRN, Linear, residual. No drop
    path: the encoder is frozen and used at inference only."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1, self.grn = nn.Linear(dim, 4 * dim), GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):                                       # (B, D, h, w)
        y = self.dwconv(x).permute(0, 2, 3, 1)                  # (B, h, w, D)
        y = self.grn(F.gelu(self.pwconv1(self.norm(y))))        # (B, h, w, 4D)
        return x + self.pwconv2(y).permute(0, 3, 1, 2)          # (B, D, h, w)


# ------------------------------------------------------------------------------------------
# The backbone (App. A.4)
# ------------------------------------------------------------------------------------------
class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 backbone without the class head. Module names are the official ones
    (downsample_layers, stages, norm), so the official conversion rules map transformers names.
    NOTE: the final LayerNorm has eps 1e-6 as officially (flax nn.LayerNorm(epsilon=1e-6));
    the transformers config of the checkpoint says layer_norm_eps = 1e-12."""

    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), in_chans=3):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=LN_EPS))])
        self.downsample_layers.extend(nn.Sequential(
            LayerNorm2d(dims[i - 1], eps=LN_EPS), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
            for i in range(1, 4))
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n)))
                                    for n, d in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)

    def forward(self, x):
        """x (B, 3, H, W), already normalized -> (the 4 stage outputs (B, D_i, h_i, w_i), the
        final LayerNorm of their global average pool (B, D_3)); transformers' hidden states and
        pooler_output."""
        maps = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))                                  # (B, D_i, h_i, w_i)
            maps.append(x)
        return maps, self.norm(x.mean((2, 3)))                  # (B, D_3)


# Official models/convnext.py ConvNextBase; parameter counts without the head, measured by a test
ConvNeXt_models = {
    "base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    # ^ 87.69M params: facebook/convnextv2-base-22k-224, the pixel models' second encoder
    "tiny": dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)),
    # ^ 0.07M params: CPU tests
}


# ------------------------------------------------------------------------------------------
# Loading transformers-format weights (facebook/convnextv2-base-22k-224)
# ------------------------------------------------------------------------------------------
# transformers ConvNextV2 names -> ours, the rules of the official convert_weights_to_jax
_HF_RENAMES = ((r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
               (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
               (r"^encoder\.stages\.(\d)\.downsampling_layer\.", r"downsample_layers.\1."),
               (r"^encoder\.stages\.(\d)\.layers\.", r"stages.\1."),
               (r"layernorm\.", "norm."),
               (r"grn\.weight$", "grn.gamma"), (r"grn\.bias$", "grn.beta"))


def hf_to_torch_name(name):
    """'convnextv2.encoder.stages.2.layers.5.grn.weight' -> 'stages.2.5.grn.gamma'; None for
    the classifier head, which the features do not use."""
    name = name.removeprefix("convnextv2.")
    if name.startswith("classifier."):
        return None
    for pattern, new in _HF_RENAMES:
        name = re.sub(pattern, new, name)
    return name


def convnext_from_hf(src, preset="base"):
    """A ConvNeXtV2 (eval mode, float32) from transformers-format weights: `src` is a
    .safetensors file (e.g. facebook/convnextv2-base-22k-224's model.safetensors), a folder
    holding model.safetensors, or a state dict. Keys may carry the `convnextv2.` prefix
    (ConvNextV2ForImageClassification) or not (ConvNextV2Model); classifier keys are ignored.
    `preset` is a ConvNeXt_models key. Raises ValueError naming every unexpected, missing or
    misshaped tensor and the file."""
    where = "state dict"
    if isinstance(src, (str, os.PathLike)):
        where = os.path.join(src, "model.safetensors") if os.path.isdir(src) else str(src)
        src = load_file(where)
    with torch.device("meta"):                                  # every tensor comes from src
        net = ConvNeXtV2(**ConvNeXt_models[preset])
    own, seen, errors = net.state_dict(), {}, []
    for name, t in src.items():
        key = hf_to_torch_name(name)
        if key is None:
            continue
        seen[key] = t.float()
        if key not in own:
            errors.append(f"unexpected {name} (-> {key})")
        elif t.shape != own[key].shape:
            errors.append(f"shape of {name}: {tuple(t.shape)}, expected {tuple(own[key].shape)}")
    errors += [f"missing {k}" for k in own if k not in seen]
    if errors:
        raise ValueError(f"{where} does not fit ConvNeXtV2 '{preset}':\n  " + "\n  ".join(errors))
    net.load_state_dict(seen, assign=True)
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Feature groups for the drift loss (official get_activations)
# ------------------------------------------------------------------------------------------
def _normalize_channels(f):
    """Official normalize(): each location's channel vector to zero mean and unit (biased) std,
    (y - mu) / (sigma + 1e-3), in float32. (B, D, h, w) -> (B, h*w, D)."""
    y = f.float().flatten(2).transpose(1, 2)                    # (B, h*w, D)
    mu, sigma = y.mean(-1, keepdim=True), y.std(-1, correction=0, keepdim=True)
    return (y - mu) / (sigma + FEAT_EPS)                        # (B, h*w, D)


def convnext_feature_groups(model, x):
    """x (B, 3, H, W) generator pixels in [-1, 1] -> dict name -> (B, T, D), the official
    ConvNextV2.get_activations of the input path of build_activation_function: (x + 1) / 2
    UNclipped (postprocess_fn with has_clip=False), ImageNet mean/std, resize to 224 (bilinear,
    antialiased on downscaling as jax.image.resize is). Groups, all of per-location-normalized
    maps: `convenxt_stage_{i}` the locations of stages 1-3, `convenxt_stage_{i}_mean` / `_std`
    over the locations of stages 0-3, `global_mean` the final LayerNorm of the pooled raw stage 3
    (the backbone's own pooled output), `global_std` = stage 3's std again (official, so it is
    weighted twice). 13 groups. The names' spelling "convenxt" is the official one. Runs in
    float32 (official convnext_bf16 = False); differentiable in x."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"ConvNeXt features need RGB images (B, 3, H, W), got {tuple(x.shape)}")
    # float32 even under the caller's bf16 autocast, as officially (the meta device, used for
    # shape checks, has no autocast)
    fp32 = contextlib.nullcontext() if x.is_meta else torch.autocast(x.device.type, enabled=False)
    with fp32:
        x = (x.float() + 1) / 2                                 # (B, 3, H, W) about [0, 1]
        mean, std = x.new_tensor(IMAGENET_MEAN), x.new_tensor(IMAGENET_STD)
        x = (x - mean[:, None, None]) / std[:, None, None]       # (B, 3, H, W)
        x = F.interpolate(x, size=(CONVNEXT_SIZE, CONVNEXT_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)  # (B, 3, 224, 224)
        maps, pooled = model(x)                                 # 4 x (B, D_i, h_i, w_i), (B, D_3)
    out = {}
    for i, f in enumerate(maps):
        y = _normalize_channels(f)                              # (B, h_i*w_i, D_i)
        if i > 0:                                               # stage 0 (56^2) has no tokens
            out[f"convenxt_stage_{i}"] = y
        out[f"convenxt_stage_{i}_mean"] = y.mean(1, keepdim=True)   # (B, 1, D_i)
        out[f"convenxt_stage_{i}_std"] = safe_std(y, 1)[:, None]  # (B, 1, D_i)
    out["global_mean"] = pooled[:, None]                        # (B, 1, D_3)
    out["global_std"] = out["convenxt_stage_3_std"]             # (B, 1, D_3)
    return out


def pixel_feature_groups(mae, convnext, x, **activation_kwargs):
    """The feature groups of a pixel generator (official build_activation_function with
    use_mae and use_convnext): feature_groups(mae, x) (global, norm_x, MAE maps; 86 at paper
    size) then convnext_feature_groups(convnext, x) (13), in that order; 99 at paper size.
    x (B, 3, H, W) in [-1, 1]."""
    out = feature_groups(mae, x, **activation_kwargs)
    extra = convnext_feature_groups(convnext, x)
    if out.keys() & extra.keys():                               # officially a dict merge would
        raise ValueError(f"group names collide: {sorted(out.keys() & extra.keys())}")  # overwrite
    return {**out, **extra}


if __name__ == "__main__":
    from encoder import ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, count_params
    with torch.device("meta"):                                  # a pixel model at paper size
        nets = {k: ConvNeXtV2(**v) for k, v in ConvNeXt_models.items()}
        mae = MAEResNet(MAEConfig(**MAE_models["pixel_640"]), with_heads=False).eval()
        x = torch.empty(2, 3, 256, 256)
        groups = pixel_feature_groups(mae, nets["base"], x, **ACTIVATION_KWARGS)
    for name, net in nets.items():
        print(f"ConvNeXt-V2 {name:>4}: {count_params(net) / 1e6:6.2f}M params  "
              f"{ConvNeXt_models[name]}")
    print(f"pixel_640 MAE + ConvNeXt-V2 base on {tuple(x.shape)}: {len(groups)} groups, "
          f"the last {len(groups) - 86} from ConvNeXt:")
    for name, f in list(groups.items())[86:]:
        print(f"  {name:<24} {tuple(f.shape)}")
