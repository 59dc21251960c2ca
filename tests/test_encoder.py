"""Tests of encoder.py: golden parity with the official JAX MAE-ResNet, the MAE objective,
and the drift-loss feature groups at paper size (built on the meta device: no memory)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.numpy import load_file

import encoder
from convert import load_official_mae_params, mae_from_official, read_artifact
from encoder import (ACTIVATION_KWARGS, MAE_models, MAEConfig, MAEResNet, count_params,
                     feature_groups, masked_l2, patch_mask, patchify, unpatchify)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PARAMS = os.path.join(FIXTURES, "mae_params.safetensors")
FORWARD = os.path.join(FIXTURES, "mae_forward.safetensors")
FULL = os.path.join(FIXTURES, "mae_full_tiny.safetensors")
with open(os.path.join(FIXTURES, "mae_manifest.json")) as f:
    MANIFEST = json.load(f)


def metadata(path):
    with safe_open(path, "np") as f:
        return f.metadata()


def golden_model(source):
    """The golden tiny MAE (encoder-only tree) from the flat safetensors or the msgpack artifact."""
    if source == "safetensors":
        cfg, flat = json.loads(metadata(PARAMS)["model_config"]), load_file(PARAMS)
    else:
        meta, flat = read_artifact(os.path.join(FIXTURES, "mae_artifact"))
        cfg = meta["model_config"]
    return mae_from_official(cfg, flat)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def expected_group_shapes(cfg, B, H, W):
    """App. A.5 / official get_activations, re-derived from the config alone: 12 maps at paper
    size (stem, 4 stage outputs, every 2nd block), 7 groups each where the patch sizes divide."""
    p, C0 = cfg.input_patch_size, cfg.base_channels
    h, w = H // p, W // p
    out = {"global": (B, 1, H * W * cfg.in_channels), "norm_x": (B, 1, cfg.in_channels * p * p)}
    maps = [("conv1", h, w, C0)]
    maps += [(f"layer{i + 1}", h >> i, w >> i, C0 << i) for i in range(len(cfg.layers))]
    maps += [(f"layer{i + 1}_blk{k}", h >> i, w >> i, C0 << i)
             for i, n in enumerate(cfg.layers) for k in range(2, n + 1, 2)]
    for name, hh, ww, D in maps:
        out.update({name: (B, hh * ww, D), f"{name}_mean": (B, 1, D), f"{name}_std": (B, 1, D)})
        for kind in ("mean", "std"):
            for s in (2, 4):
                if hh % s == 0 and ww % s == 0:
                    out[f"{name}_{kind}_{s}"] = (B, (hh // s) * (ww // s), D)
    return out


# ------------------------------------------------------------------------------------------
# Golden parity (official MAEResNetJAX, golden/README.md section 3)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["safetensors", "msgpack"])
def test_feature_groups_match_official(source):
    """All 56 official feature groups (global + get_activations) equal the JAX ones, in the
    official dict order, from the flat params and from the release-format msgpack artifact."""
    model = golden_model(source)
    gold = load_file(FORWARD)
    with torch.no_grad():
        feats = feature_groups(model, nchw(gold["in/x"]), **ACTIVATION_KWARGS)
    assert list(feats) == MANIFEST["feature_names_in_official_dict_order"]
    assert len(feats) == 56
    for name, f in feats.items():
        assert list(f.shape) == MANIFEST["feature_shapes"][name], name
        torch.testing.assert_close(f, torch.from_numpy(gold[f"feat/{name}"]), atol=1e-5,
                                   rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_block_outputs_match_official():
    """The raw block-1 outputs of every stage (enc/*, not in the feature dict) match: checks the
    stride-2 blocks with their 1x1 projection shortcut directly."""
    model = golden_model("safetensors")
    gold = load_file(FORWARD)
    with torch.no_grad():
        _, blocks = model.encoder(nchw(gold["in/x"]))
    for i in range(1, 5):
        torch.testing.assert_close(blocks[f"layer{i}"][0], nchw(gold[f"enc/layer{i}_block1"]),
                                   atol=1e-5, rtol=1e-4)


def test_full_model_decoder_and_loss_match_official():
    """The decoder, class head and MAE loss (not in the golden set) equal the official full model.

    mae_full_tiny.safetensors was made with the unmodified official MAEResNetJAX (accd0cf) in
    the golden README's pinned env (jax 0.4.37, flax 0.10.4): base 32, layers [1,1,1,1], 3-ch
    32x32 input with input_patch_size 2 (so patchify's channel order is checked too). Params are
    not stored: the recipe in its metadata regenerates them from np.random.RandomState(2024).
    mask ratio 1 masks everything, which makes the official loss deterministic."""
    gold, meta = load_file(FULL), metadata(FULL)
    shapes, rs, flat = json.loads(meta["param_shapes"]), np.random.RandomState(2024), {}
    for name in sorted(shapes):
        z = rs.standard_normal(shapes[name]).astype(np.float32)
        flat[name] = (z / np.sqrt(np.prod(shapes[name][:-1])) if name.endswith("kernel")
                      else 1 + 0.1 * z if name.endswith("scale") else 0.1 * z)
    model = mae_from_official(json.loads(meta["model_config"]), flat)
    assert model.with_heads                                     # decoder/fc found and loaded
    x, labels = nchw(gold["in/x"]), torch.from_numpy(gold["in/labels"]).long()
    with torch.no_grad():
        xp = patchify(x, 2)
        torch.testing.assert_close(xp, nchw(gold["out/x_patched"]), atol=0, rtol=0)
        recon = model.decoder(model.encoder(xp)[0])
        torch.testing.assert_close(recon, nchw(gold["out/recon"]), atol=1e-5, rtol=1e-4)
        loss, info = model.mae_loss(x, labels, lam=0.3, mask_ratio=1.0)
        feats = feature_groups(model, x)
    for ours, key in [(loss, "loss"), (info["cls_loss"], "cls_loss"),
                      (info["recon_loss"], "recon_loss")]:
        torch.testing.assert_close(ours, torch.tensor(gold[f"out/{key}"].mean()), rtol=1e-5, atol=0)
    for name in ("norm_x", "conv1", "layer4", "layer1_std_4"):
        torch.testing.assert_close(feats[name], torch.from_numpy(gold[f"feat/{name}"]),
                                   atol=1e-5, rtol=1e-4)


def test_loader_names_missing_and_misshaped_tensors():
    """A bad official tree fails loudly, naming each missing, misshaped or unknown tensor,
    instead of silently leaving random weights in the encoder."""
    flat = load_file(PARAMS)
    cfg = MAEConfig(**json.loads(metadata(PARAMS)["model_config"]))
    bad = dict(flat)
    del bad["encoder/stages_1/layers_0/proj_gn/scale"]
    bad["encoder/conv1/kernel"] = flat["encoder/conv1/kernel"].transpose(0, 1, 3, 2)
    bad["encoder/stages_9/layers_0/conv1/kernel"] = flat["encoder/conv1/kernel"]
    with pytest.raises(ValueError) as e:
        load_official_mae_params(MAEResNet(cfg, with_heads=False), bad)
    for name in ("stages.1.0.proj_gn.weight", "encoder/conv1/kernel", "stages_9"):
        assert name in str(e.value)
    # a partial decoder is refused too (decoder and head load all-or-nothing)
    cfg32 = MAEConfig(**{**vars(cfg), "base_channels": 32})     # the decoder needs C_0 % 32 == 0
    with pytest.raises(ValueError, match="missing decoder.head.weight"):
        load_official_mae_params(MAEResNet(cfg32), {
            "decoder/bridge/conv/kernel": np.zeros((3, 3, 256, 256), np.float32)})


def test_weights_of_another_mae_are_named():
    """mae_from_state on tensors of another architecture (the per-pixel MNIST MAE's under the
    tiny config) names the config and the first mismatched tensors, instead of a raw
    size-mismatch error; the matching weights still load."""
    torch.manual_seed(0)
    mnist = MAEResNet(MAEConfig(**MAE_models["mnist_pixel"]), with_heads=False).state_dict()
    tiny = MAE_models["tiny"]
    with pytest.raises(ValueError, match=r"their config \{'in_channels': 4.*encoder\.conv1\.weight "
                       r"\(32, 1, 3, 3\) \(the config's: \(32, 4, 3, 3\)\).*more; pass the "
                       r"--mae-ckpt made for this --mae-model / data"):
        encoder.mae_from_state(tiny, mnist, encoder_only=True)
    with pytest.raises(ValueError, match="unexpected encoder.extra"):
        encoder.mae_from_state(MAE_models["mnist_pixel"],
                               {**mnist, "encoder.extra": torch.zeros(1)})
    model = encoder.mae_from_state(MAE_models["mnist_pixel"], mnist, encoder_only=True)
    assert torch.equal(model.state_dict()["encoder.conv1.weight"], mnist["encoder.conv1.weight"])


# ------------------------------------------------------------------------------------------
# Input patching and the MAE objective (App. A.3)
# ------------------------------------------------------------------------------------------
def test_patchify_is_official_space_to_depth():
    """patchify = the official NHWC rearrange 'b (h i) (w j) c -> b h w (i j c)' (the pixel MAE's
    8x8 patches; released pixel weights depend on this channel order), and unpatchify inverts it."""
    x = torch.randn(2, 3, 16, 24)
    ref = rearrange(x.permute(0, 2, 3, 1), "b (h i) (w j) c -> b h w (i j c)", i=8, j=8)
    torch.testing.assert_close(patchify(x, 8).permute(0, 2, 3, 1), ref, atol=0, rtol=0)
    torch.testing.assert_close(unpatchify(patchify(x, 8), 8), x, atol=0, rtol=0)


def test_mask_is_half_of_whole_2x2_units():
    """Masking: 2x2 units on the input grid, each zeroed with probability 0.5 independently, and
    reproducible from the caller's torch.Generator."""
    g = torch.Generator().manual_seed(0)
    mask = patch_mask(512, 32, 32, unit=2, ratio=0.5, generator=g)
    assert mask.shape == (512, 1, 32, 32)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    units = mask.reshape(512, 16, 2, 16, 2)                      # every unit constant
    assert torch.equal(units.amax((2, 4)), units.amin((2, 4)))
    assert abs(mask.mean().item() - 0.5) < 0.01                  # 131072 units: 7 sigma
    again = patch_mask(512, 32, 32, 2, 0.5, torch.Generator().manual_seed(0))
    other = patch_mask(512, 32, 32, 2, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_loss_only_on_masked_elements():
    """L2 on masked units only: changing predictions at unmasked units leaves the loss unchanged,
    changing masked ones does not. Scale: per masked location, summed over channels (official)."""
    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 6, 8, 8, generator=g)
    mask = patch_mask(4, 8, 8, generator=g)
    loss = masked_l2(recon, target, mask)
    noise = 10 * torch.randn(4, 6, 8, 8, generator=g)
    torch.testing.assert_close(masked_l2(recon + (1 - mask) * noise, target, mask), loss)
    assert (masked_l2(recon + mask * noise, target, mask) - loss).abs().min() > 1e-2
    se, m = (recon - target) ** 2, mask.expand_as(recon).bool()
    per_elem = torch.stack([se[b][m[b]].mean() for b in range(4)])
    torch.testing.assert_close(loss, 6 * per_elem)


def test_cls_finetune_combination_and_decoder_shape():
    """The cls fine-tune loss is lam * CE + (1 - lam) * rec (same mask for the same generator
    seed), the decoder returns the input's shape, and with lam = 0 the head still gets a (zero)
    gradient, so DDP sees every parameter used."""
    torch.manual_seed(0)
    model = MAEResNet(MAEConfig(**MAE_models["tiny"])).train()
    x, labels = torch.randn(4, 4, 16, 16), torch.tensor([0, 3, 5, 9])
    losses = {}
    for lam in (0.0, 0.1, 1.0):
        model.zero_grad()
        loss, info = model.mae_loss(x, labels, lam, torch.Generator().manual_seed(1))
        loss.backward()
        losses[lam] = loss.detach()
        if lam == 0.0:
            torch.testing.assert_close(loss.detach(), info["recon_loss"])
            assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().max() == 0
    torch.testing.assert_close(losses[0.1], 0.1 * losses[1.0] + 0.9 * losses[0.0])
    with torch.no_grad():
        assert model.decoder(model.encoder(x)[0]).shape == x.shape
    with pytest.raises(ValueError):
        model.mae_loss(x, None, lam=0.1)


# ------------------------------------------------------------------------------------------
# Feature groups (App. A.5)
# ------------------------------------------------------------------------------------------
def test_expected_group_rule_reproduces_official_manifest():
    """The group rule used below at paper size is right: it reproduces the official names, order
    and shapes of the golden tiny model (manifest written by the JAX code)."""
    cfg = MAEConfig(**json.loads(metadata(PARAMS)["model_config"]))
    exp = expected_group_shapes(cfg, 3, 16, 16)
    assert sorted(exp) == sorted(MANIFEST["feature_names_in_official_dict_order"])
    assert {k: list(v) for k, v in exp.items()} == MANIFEST["feature_shapes"]


@pytest.mark.parametrize("preset,shape", [("latent_640", (2, 4, 32, 32)),
                                          ("pixel_640", (2, 3, 256, 256))])
def test_paper_size_feature_groups(preset, shape):
    """At paper size (MAE-640 on 32x32x4 latents / 8x8-patched 256px images) the groups have the
    official names and shapes: 12 maps x 7 + norm_x + global = 86 (paper App. A.5). The decoder
    returns the input's shape. Built on the meta device: shapes without 10 GB of weights."""
    cfg = MAEConfig(**MAE_models[preset])
    with torch.device("meta"):
        model = MAEResNet(cfg).eval()
        x = torch.empty(shape)
        feats = feature_groups(model, x, **ACTIVATION_KWARGS)
        recon = unpatchify(model.decoder(model.encoder(patchify(x, cfg.input_patch_size))[0]),
                           cfg.input_patch_size)
    exp = expected_group_shapes(cfg, *shape[:1], *shape[2:])
    assert {k: tuple(v.shape) for k, v in feats.items()} == exp
    assert list(feats)[:3] == ["global", "norm_x", "conv1"] and len(feats) == 86
    assert recon.shape == shape


def test_gradient_flows_through_phi_to_input():
    """The generator is trained through phi: with phi frozen, groups from the stem, the deepest
    map, a block's patch stds and norm_x each pass a finite, nonzero gradient to the input."""
    torch.manual_seed(0)
    model = MAEResNet(MAEConfig(**MAE_models["tiny"]), with_heads=False).requires_grad_(False)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    feats = feature_groups(model, x, **ACTIVATION_KWARGS)
    for name in ("conv1", "layer4", "layer2_blk2_std_2", "norm_x"):
        (g,) = torch.autograd.grad(feats[name].square().mean(), x, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().max() > 0, name


def test_preset_parameter_counts_in_comments():
    """The parameter counts written beside each preset (in millions, with decoder and head)
    are the measured ones (STYLE.md: presets carry their measured size)."""
    src = open(encoder.__file__).read()
    for name, preset in MAE_models.items():
        m = re.search(rf'"{name}": dict\(.*?# \^ ([\d.]+)M params', src, re.S)
        assert m, f"no parameter-count comment for preset {name}"
        with torch.device("meta"):
            n = count_params(MAEResNet(MAEConfig(**preset)))
        assert abs(float(m.group(1)) - n / 1e6) < 0.01, (name, n)
