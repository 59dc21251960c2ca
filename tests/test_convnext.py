"""Tests of the pixel models' encoders, convnext.py and encoder.py's pixel MAE: ConvNeXt-V2
against transformers.ConvNextV2Model through the real checkpoint names, its input path and
feature groups as in the official models/convnext.py + mae_model.build_activation_function, its
preset sizes, the pixel MAE's 8x8 space-to-depth, and the 99 groups of a pixel model at paper
size (meta device)."""
import re

import numpy as np
import pytest
import torch
import transformers              # a test dependency (requirements-dev.txt)
from safetensors.torch import save_file

import convnext
from convnext import (IMAGENET_MEAN, IMAGENET_STD, ConvNeXt_models, ConvNeXtV2,
                      convnext_feature_groups, convnext_from_hf, pixel_feature_groups)
from encoder import (ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, count_params,
                     feature_groups)

TINY = ConvNeXt_models["tiny"]


def hf_state(cls_name, seed=0):
    """A seeded random transformers ConvNextV2 of the tiny size and its state dict (real
    transformers names). Every tensor is perturbed from its init, so GRN's zero gamma/beta and
    LayerNorm's unit weight cannot hide a wrong mapping or a wrong formula. layer_norm_eps is set
    to the official 1e-6 (the hub config says 1e-12; see the NOTE on ConvNeXtV2)."""
    torch.manual_seed(seed)
    cfg = transformers.ConvNextV2Config(hidden_sizes=list(TINY["dims"]),
                                        depths=list(TINY["depths"]), image_size=64,
                                        layer_norm_eps=1e-6, num_labels=10)
    hf = getattr(transformers, cls_name)(cfg).eval()
    state = {k: v + (0.5 if "grn" in k else 0.2) * torch.randn_like(v)
             for k, v in hf.state_dict().items()}
    hf.load_state_dict(state)
    return hf, state


def random_convnext(seed=0):
    return convnext_from_hf(hf_state("ConvNextV2Model", seed)[1], "tiny")


# ------------------------------------------------------------------------------------------
# Parity with transformers (the weights the paper's pixel models use are a transformers file)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name,as_folder", [("ConvNextV2Model", False),
                                                ("ConvNextV2ForImageClassification", True)])
def test_parity_with_transformers(tmp_path, cls_name, as_folder):
    """Loaded from a safetensors file in transformers naming (with and without the
    `convnextv2.` prefix and classifier keys, as a file or a snapshot folder), our ConvNeXtV2
    gives transformers' 4 stage hidden states and pooled output to float32 rounding."""
    hf, state = hf_state(cls_name)
    prefixed = cls_name.endswith("Classification")
    assert ("convnextv2.encoder.stages.3.layers.0.grn.weight" in state) == prefixed
    assert ("classifier.weight" in state) == prefixed
    save_file(state, tmp_path / "model.safetensors")
    ours = convnext_from_hf(tmp_path if as_folder else tmp_path / "model.safetensors", "tiny")
    base = hf.convnextv2 if prefixed else hf
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = base(x, output_hidden_states=True)
        maps, pooled = ours(x)
    assert len(ref.hidden_states) == 5                          # embeddings, then 4 stages
    refs = list(ref.hidden_states[1:]) + [ref.pooler_output]
    for i, (a, b) in enumerate(zip(maps + [pooled], refs)):
        assert a.shape == b.shape, i
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, (i, err)


def test_loader_names_bad_keys_and_file(tmp_path):
    """A wrong file fails loudly: every missing, unexpected and misshaped tensor is named, with
    the file's path."""
    _, state = hf_state("ConvNextV2Model")
    del state["encoder.stages.2.layers.1.grn.weight"]
    state["encoder.stages.0.layers.0.gamma"] = torch.zeros(8)   # a ConvNeXt-V1 layer-scale key
    state["layernorm.bias"] = torch.zeros(65)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError) as e:
        convnext_from_hf(path, "tiny")
    msg = str(e.value)
    assert str(path) in msg
    assert "missing stages.2.1.grn.gamma" in msg
    assert "unexpected encoder.stages.0.layers.0.gamma" in msg
    assert "shape of layernorm.bias: (65,), expected (64,)" in msg
    with pytest.raises(ValueError, match="does not fit ConvNeXtV2 'base'"):
        convnext_from_hf(hf_state("ConvNextV2Model")[1], "base")   # tiny weights, base preset


# ------------------------------------------------------------------------------------------
# The official input path and groups (models/convnext.py get_activations, mae_model.py)
# ------------------------------------------------------------------------------------------
def jax_resize_matrix(n_in, n_out):
    """jax.image.resize(method='bilinear') along one axis, written from its documented math
    (scale_and_translate, antialias=True): output i samples input position (i + 0.5) s - 0.5,
    s = n_in / n_out, with a triangle kernel widened by max(s, 1), weights normalized to 1."""
    s = n_in / n_out
    pos = (np.arange(n_out) + 0.5) * s - 0.5                    # (n_out,)
    w = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(n_in)) / max(s, 1))   # (n_out, n_in)
    return w / w.sum(1, keepdims=True)


def test_input_path_and_groups_are_official():
    """Recomputed here from the official code: (x + 1) / 2 UNclipped, ImageNet mean/std, the
    antialiased 256 -> 224 resize of jax.image.resize (plain bilinear differs by O(1) on noise);
    then per map, each location normalized over channels, (y - mu) / (sigma + 1e-3), and of
    that the tokens (stages 1-3), the mean and the sqrt(var + 1e-6) over locations (stages
    0-3); global_mean the pooled output; global_std stage 3's std again. 13 groups in order."""
    net = random_convnext()
    x = 1.2 * torch.randn(2, 3, 256, 256, dtype=torch.float64)  # beyond [-1, 1]: no clip
    y = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN, dtype=x.dtype)[:, None, None]) \
        / torch.tensor(IMAGENET_STD, dtype=x.dtype)[:, None, None]
    M = torch.from_numpy(jax_resize_matrix(256, 224))           # (224, 256)
    y = (M @ y @ M.T).float()                                   # (2, 3, 224, 224)
    with torch.no_grad():
        feats = convnext_feature_groups(net, x.float())
        maps, pooled = net(y)
    want = {}
    for i, f in enumerate(maps):
        t = f.flatten(2).transpose(1, 2)                        # (B, T, D)
        t = (t - t.mean(-1, keepdim=True)) / (t.std(-1, correction=0, keepdim=True) + 1e-3)
        if i > 0:
            want[f"convenxt_stage_{i}"] = t
        want[f"convenxt_stage_{i}_mean"] = t.mean(1, keepdim=True)
        want[f"convenxt_stage_{i}_std"] = (t.var(1, correction=0, keepdim=True) + 1e-6).sqrt()
    want["global_mean"] = pooled[:, None]
    want["global_std"] = want["convenxt_stage_3_std"]
    assert list(feats) == list(want)
    for name in want:
        torch.testing.assert_close(feats[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


def test_gradient_reaches_pixels():
    """A pixel generator trains through both frozen encoders: every ConvNeXt group, and the
    combined pixel groups of the tiny pixel MAE, pass a finite, nonzero gradient to x."""
    net = random_convnext()
    torch.manual_seed(0)
    mae = MAEResNet(MAEConfig(**MAE_models["pixel_tiny"]), with_heads=False).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    feats = pixel_feature_groups(mae.requires_grad_(False), net, x, **ACTIVATION_KWARGS)
    for name in [k for k in feats if "convenxt" in k or "global" in k] + ["layer4", "norm_x"]:
        (g,) = torch.autograd.grad(feats[name].square().mean(), x, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().max() > 0, name


def test_bad_inputs():
    """ConvNeXt features take RGB images (B, 3, H, W) only: latents or unbatched images are
    an error, not a silent broadcast."""
    net = random_convnext()
    for shape in [(2, 4, 32, 32), (3, 64, 64)]:
        with pytest.raises(ValueError, match="RGB images"):
            convnext_feature_groups(net, torch.randn(shape))


def test_preset_parameter_counts_in_comments():
    """The parameter counts written beside each ConvNeXt preset (millions, no class head) are
    the measured ones (STYLE.md: presets carry their measured size)."""
    src = open(convnext.__file__).read()
    for name, preset in ConvNeXt_models.items():
        m = re.search(rf'"{name}": dict\(.*?# \^ ([\d.]+)M params', src, re.S)
        assert m, f"no parameter-count comment for preset {name}"
        with torch.device("meta"):
            n = count_params(ConvNeXtV2(**preset))
        assert abs(float(m.group(1)) - n / 1e6) < 0.01, (name, n)


# ------------------------------------------------------------------------------------------
# The pixel MAE (8x8 space-to-depth) and the paper-size list
# ------------------------------------------------------------------------------------------
def test_pixel_mae_patches_8x8():
    """The pixel MAE runs on 8x8 space-to-depth patches, 64 px -> 8x8x192 (paper size: 256 px ->
    32x32x192): the stem sees 192 channels, the loss reconstructs the patched image, and the
    groups' grid is the patched one."""
    torch.manual_seed(0)
    cfg = MAEConfig(**MAE_models["pixel_tiny"])
    model = MAEResNet(cfg)
    assert model.encoder.conv1.in_channels == 192 and model.decoder.head.out_channels == 192
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, info = model.train().mae_loss(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and 0 < info["mask_ratio"] < 1
    feats = feature_groups(model.eval(), x, **ACTIVATION_KWARGS)
    assert feats["global"].shape == (2, 1, 64 * 64 * 3) and feats["norm_x"].shape == (2, 1, 192)
    assert feats["conv1"].shape == (2, 64, 32) and feats["layer4"].shape == (2, 1, 256)


# The official ConvNextV2.get_activations at paper size, enumerated by hand: ConvNeXt-V2-B
# (dims 128, 256, 512, 1024) on the 224 px resize has stage grids 56, 28, 14, 7; stages 1-3
# give per-location tokens, stages 0-3 a mean and a std, then global_mean and global_std.
CONVNEXT_PAPER_GROUPS = [
    ("convenxt_stage_0_mean", 1, 128), ("convenxt_stage_0_std", 1, 128),
    ("convenxt_stage_1", 28 * 28, 256), ("convenxt_stage_1_mean", 1, 256),
    ("convenxt_stage_1_std", 1, 256),
    ("convenxt_stage_2", 14 * 14, 512), ("convenxt_stage_2_mean", 1, 512),
    ("convenxt_stage_2_std", 1, 512),
    ("convenxt_stage_3", 7 * 7, 1024), ("convenxt_stage_3_mean", 1, 1024),
    ("convenxt_stage_3_std", 1, 1024),
    ("global_mean", 1, 1024), ("global_std", 1, 1024),
]


def test_pixel_groups_at_paper_size_on_meta():
    """A pixel model's groups (configs/gen/pixel_sota_*.yaml: pixel-MAE-640 + ConvNeXt-V2-B on
    256x256x3) are the MAE's 86 (global, norm_x, 12 maps x 7), then the 13 official ConvNeXt
    groups in official order: 99, no name clash. Shapes only, so on the meta device."""
    with torch.device("meta"):
        mae = MAEResNet(MAEConfig(**MAE_models["pixel_640"]), with_heads=False).eval()
        net = ConvNeXtV2(**ConvNeXt_models["base"])
        x = torch.empty(2, 3, 256, 256)
        feats = pixel_feature_groups(mae, net, x, **ACTIVATION_KWARGS)
        mae_feats = feature_groups(mae, x, **ACTIVATION_KWARGS)
    shapes = [(k, *v.shape) for k, v in feats.items()]
    assert len(feats) == 99 and len(mae_feats) == 86
    assert shapes[:86] == [(k, *v.shape) for k, v in mae_feats.items()]
    assert shapes[86:] == [(name, 2, T, D) for name, T, D in CONVNEXT_PAPER_GROUPS]
    assert feats["global"].shape == (2, 1, 256 * 256 * 3)
    assert feats["conv1"].shape == (2, 32 * 32, 640)            # 8x8 patches: a 32x32 grid


# ------------------------------------------------------------------------------------------
# A pixel generator trained end to end on an image folder with both encoders (CPU smoke run)
# ------------------------------------------------------------------------------------------
def test_pixel_smoke_run_with_both_encoders(tmp_path):
    """train.py --model S8 (64x64 pixels) on a generated ImageNet-layout folder, with the
    RandomResizedCrop augmentation of the official pixel recipes, the pixel MAE (8x8 patches)
    and ConvNeXt-V2 (transformers-named file): 3 steps run, losses finite. The same run with
    the MAE alone has a smaller loss at step 1 (same draws, 13 fewer positive group losses)."""
    from PIL import Image
    import train
    from checkpoint import read_train_state, save_checkpoint
    from sample import load_checkpoint
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(
                tmp_path / "train" / c / f"{i}.png")
    torch.manual_seed(0)
    save_checkpoint(MAEResNet(MAEConfig(**MAE_models["pixel_tiny"]), with_heads=False),
                    str(tmp_path / "mae.safetensors"), kind="mae")
    save_file(hf_state("ConvNextV2Model")[1], tmp_path / "convnext.safetensors")
    common = ["--model", "S8", "--data-path", str(tmp_path / "train"), "--mae-ckpt",
              str(tmp_path / "mae.safetensors"), "--steps", "3", "--n-classes-per-step", "2",
              "--gen-per-label", "4", "--n-pos", "3", "--n-unc", "2", "--device", "cpu",
              "--log-every", "1", "--sample-every", "0"]
    both = train.main(common + ["--out", str(tmp_path / "both"), "--convnext",
                                str(tmp_path / "convnext.safetensors"), "--convnext-model",
                                "tiny"])
    mae_only = train.main(common + ["--out", str(tmp_path / "mae_only")])
    hist = [read_train_state(str(tmp_path / d))["history"]
            for d in ("both", "mae_only")]
    assert all(np.isfinite(h["loss"]) for h in hist[0] + hist[1])
    assert hist[0][0]["loss"] > hist[1][0]["loss"]
    assert both["step"] == 3 and load_checkpoint(str(tmp_path / "both")).cfg.input_size == 64
    with pytest.raises(ValueError, match="--convnext PATH"):
        train.main(["--model", "B16", "--data-path", str(tmp_path / "train"), "--mae-ckpt",
                    str(tmp_path / "mae.safetensors"), "--out", str(tmp_path / "b16"),
                    "--device", "cpu"])
