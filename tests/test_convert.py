"""Tests of convert.py: official artifacts -> our weights file, and its error messages."""
import json
import os
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import convert
from sample import load_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ARTIFACT = os.path.join(FIXTURES, "gen_artifact")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def official():
    """(metadata, flat params) of the golden release-format artifact."""
    return convert.read_artifact(ARTIFACT)


def test_msgpack_and_flat_safetensors_hold_the_same_tensors(official):
    """The msgpack flattening gives exactly the flat names and values of gen_params."""
    _, flat = official
    _, flat2 = convert.read_flat_safetensors(os.path.join(FIXTURES, "gen_params.safetensors"))
    assert set(flat) == set(flat2)
    assert all(np.array_equal(flat[k], flat2[k]) for k in flat)


@pytest.mark.parametrize("key, value, match", [
    ("use_fancy_norm", True, "unknown generator model_config key 'use_fancy_norm'"),
    ("use_rope", False, "use_rope=False is not supported"),
    ("use_swiglu", None, "use_swiglu=None is not supported"),
    ("patch_size", 3, "does not build a DriftDiT: input_size 16 not divisible by p=3"),
])
def test_bad_model_config_is_named(official, key, value, match):
    """An unknown model_config key, an architecture flag we do not implement, or a value that
    builds no model raises a ValueError that names it (instead of building something else)."""
    meta, flat = official
    bad = dict(meta, model_config={**meta["model_config"], key: value})
    with pytest.raises(ValueError, match=match):
        convert.convert(bad, flat)


def test_missing_model_config_key_is_named(official):
    """A model_config without a size we need is rejected by name (no silent default)."""
    meta, flat = official
    cfg = {k: v for k, v in meta["model_config"].items() if k != "n_cls_tokens"}
    with pytest.raises(ValueError, match="lacks \\['n_cls_tokens'\\]"):
        convert.convert(dict(meta, model_config=cfg), flat)


def test_missing_extra_or_misshaped_tensor_is_named(official):
    """A tensor that is absent, unexpected or of the wrong shape is named in the error."""
    meta, flat = official
    name = "LightningDiT_0/blocks_1/Attention_0/q_norm/weight"
    with pytest.raises(ValueError, match=f"missing \\['{name}'\\]"):
        convert.convert(meta, {k: v for k, v in flat.items() if k != name})
    with pytest.raises(ValueError, match="unexpected \\['LightningDiT_0/blocks_2/extra'\\]"):
        convert.convert(meta, {**flat, "LightningDiT_0/blocks_2/extra": np.zeros(3)})
    k = "LightningDiT_0/TorchLinear_0/Dense_0/kernel"
    with pytest.raises(ValueError, match=f"{k} has shape \\(16, 65\\)"):
        convert.convert(meta, {**flat, k: np.zeros((16, 65), np.float32)})


def test_unknown_kind_is_rejected(official):
    """Dispatch is on metadata['kind']; an unknown kind raises and lists the known ones."""
    meta, flat = official
    with pytest.raises(ValueError, match="unknown artifact kind 'vae'.*'gen'"):
        convert.convert(dict(meta, kind="vae"), flat)


def _ext_ndarray(a):
    """flax's msgpack encoding of an ndarray: ExtType(1, packb((shape, dtype, bytes)))."""
    payload = msgpack.packb((list(a.shape), a.dtype.name, a.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(1, payload)


def test_chunked_and_bf16_msgpack_leaves_read_back(tmp_path):
    """Leaves over 2**30 bytes are written by flax as {'__msgpack_chunked_array__': True,
    'shape': {'0': ..}, 'chunks': {'0': flat chunk, ..}} (flax serialization._chunk); the
    reader re-joins them. bfloat16 leaves are widened exactly to float32."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((3, 5, 7)).astype(np.float32)
    flat = big.reshape(-1)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 3, "1": 5, "2": 7},
               "chunks": {"0": _ext_ndarray(flat[:40]), "1": _ext_ndarray(flat[40:80]),
                          "2": _ext_ndarray(flat[80:])}}
    small = rng.standard_normal(4).astype(np.float32)
    bf16_bits = (small.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    bf16 = msgpack.ExtType(1, msgpack.packb(([4], "bfloat16", bf16_bits.tobytes()),
                                            use_bin_type=True))
    tree = {"Block_0": {"Dense_0": {"kernel": chunked, "bias": _ext_ndarray(small)}},
            "norm": {"weight": bf16}}
    path = tmp_path / "ema_params.msgpack"
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    got = convert.read_flax_msgpack(str(path))
    assert set(got) == {"Block_0/Dense_0/kernel", "Block_0/Dense_0/bias", "norm/weight"}
    assert np.array_equal(got["Block_0/Dense_0/kernel"], big)
    assert np.array_equal(got["Block_0/Dense_0/bias"], small)
    assert np.array_equal(got["norm/weight"], (bf16_bits.astype(np.uint32) << 16).view(np.float32))


def test_cli_roundtrip(tmp_path, official):
    """`python convert.py --artifact DIR --out DIR` writes model.safetensors (our names, config
    JSON and kind in its metadata) that load_checkpoint turns into the identical model."""
    out = tmp_path / "official"
    subprocess.run([sys.executable, "convert.py", "--artifact", ARTIFACT, "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    path = out / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "gen" and json.loads(meta["config"])["depth"] == 2
    ref = convert.convert(*official)
    assert set(load_file(str(path))) == set(ref.state_dict())
    back = load_checkpoint(str(out))
    assert back.cfg == ref.cfg
    for (n, p), q in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), n


def test_mae_artifact_cli_round_trip(tmp_path):
    """convert.py learns the MAE artifact: the golden encoder-only msgpack becomes a kind-"mae"
    model.safetensors whose reloaded encoder reproduces the official feature groups."""
    from encoder import ACTIVATION_KWARGS, feature_groups, mae_from_state
    from checkpoint import read_checkpoint
    out = tmp_path / "mae"
    subprocess.run([sys.executable, "convert.py", "--artifact",
                    os.path.join(FIXTURES, "mae_artifact"), "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    config, sd, meta = read_checkpoint(str(out), "mae")
    assert meta["kind"] == "mae" and not any(k.startswith("decoder.") for k in sd)
    model = mae_from_state(config, sd)
    golden = load_file(os.path.join(FIXTURES, "mae_forward.safetensors"))
    x = golden["in/x"].permute(0, 3, 1, 2)                           # NHWC -> NCHW
    with torch.no_grad():
        feats = feature_groups(model, x, **ACTIVATION_KWARGS)
    for name in ("conv1", "layer4", "layer2_blk2_std_2"):
        torch.testing.assert_close(feats[name], golden[f"feat/{name}"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="expected 'gen'"):
        load_checkpoint(str(out))                                    # an encoder is no generator


def test_cli_refuses_to_replace_weights(tmp_path, capsys):
    """--out holding a model.safetensors (a training run) is refused before any work, its file
    untouched; --overwrite replaces it."""
    (tmp_path / "model.safetensors").write_bytes(b"a training run's weights")
    with pytest.raises(SystemExit) as e:
        convert.main(["--artifact", ARTIFACT, "--out", str(tmp_path)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"a training run's weights"
    convert.main(["--artifact", ARTIFACT, "--out", str(tmp_path), "--overwrite"])
    assert load_checkpoint(str(tmp_path)).cfg.depth == 2


def test_cli_errors_are_one_line_and_name_the_file(tmp_path):
    """A missing --artifact ends in one 'convert.py: error:' line (exit 1, no traceback); a
    broken metadata.json is named, and nothing is written."""
    run = subprocess.run([sys.executable, "convert.py", "--artifact", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"convert.py: error: --artifact {tmp_path / 'nope'}: no such folder or file (an official "
        f"artifact folder or a flat .safetensors)"]
    art = tmp_path / "artifact"
    shutil.copytree(ARTIFACT, art)
    (art / "metadata.json").write_text('{"kind": "gen",')
    with pytest.raises(ValueError, match="metadata.json: not valid JSON"):
        convert.main(["--artifact", str(art), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_read_checkpoint_prefers_ema(tmp_path):
    """A training checkpoint holds weights and their EMA ("ema/"): readers return the EMA by
    default (as sampling and the frozen encoder need) and the raw weights on request."""
    from checkpoint import save_checkpoint
    from models import DriftDiT, DriftDiTConfig, DriftDiT_models
    torch.manual_seed(0)
    cfg = DriftDiTConfig(**{**DriftDiT_models["S4"], "depth": 1})
    model, ema = DriftDiT(cfg), DriftDiT(cfg)
    save_checkpoint(model, tmp_path / "model.safetensors", ema=ema, step=7)
    got = load_checkpoint(str(tmp_path))
    raw = load_checkpoint(str(tmp_path), ema=False)
    assert torch.equal(got.y_embed.weight, ema.y_embed.weight)
    assert torch.equal(raw.y_embed.weight, model.y_embed.weight)
    assert not torch.equal(raw.y_embed.weight, got.y_embed.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable"):
        load_checkpoint(str(tmp_path / "bad.safetensors"))
