"""
Convert the official JAX release artifacts (lambertae/drifting) into our checkpoints.

An official artifact is a folder: `ema_params.msgpack` (flax.serialization.msgpack_serialize of
the bare parameter tree) and `metadata.json` (`kind`, `model_config`, ...). We read the msgpack
with plain `msgpack` (no JAX / flax), rename the flax leaves to our state_dict names and write
`OUT/model.safetensors` with our config in its metadata, all `sample.load_checkpoint(OUT)` needs.

Paper: Generative Modeling via Drifting, arXiv:2602.04770.
    python convert.py --artifact path/to/gen_artifact --out runs/official_L2
    python convert.py --artifact flat_params.safetensors --kind gen --out runs/x  # flat names
An --out that already holds a model.safetensors (a training run) is refused without --overwrite.
"""
import argparse
import json
import os
import re
import sys
from functools import partial

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from checkpoint import save_checkpoint
from encoder import MAEConfig, MAEResNet
from models import DriftDiT

# ------------------------------------------------------------------------------------------
# Reading flax msgpack without flax
# ------------------------------------------------------------------------------------------
# flax.serialization (flax/serialization.py, _MsgpackExtType) stores every array as a msgpack
# ExtType: ndarray = 1 with payload msgpack((shape, dtype_name, raw_bytes)), native complex = 2,
# numpy scalar = 3 with payload msgpack((dtype_name, raw_bytes)). Leaves over 2**30 bytes are
# split into {"__msgpack_chunked_array__": True, "shape": {"0": ..}, "chunks": {"0": flat, ..}}.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


def _decode(name, buf):
    if name != "bfloat16":
        return np.frombuffer(buf, dtype=np.dtype(name))
    # bfloat16 is not a numpy dtype; it is float32's top half, so we widen it exactly.
    return (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _ext_hook(code, data):
    import msgpack
    if code == _EXT_NDARRAY:
        shape, dtype, buf = msgpack.unpackb(data)
        return _decode(dtype, buf).reshape(shape)
    if code == _EXT_NPSCALAR:
        return _decode(*msgpack.unpackb(data))[0]
    if code == _EXT_COMPLEX:
        return complex(*msgpack.unpackb(data))
    raise ValueError(f"unknown flax msgpack extension type {code}")


def _flatten(tree, prefix=""):
    """Nested dict -> {'a/b/c': np.ndarray}, re-joining flax's chunked large arrays."""
    out = {}
    for key, val in tree.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict) and val.get("__msgpack_chunked_array__"):
            shape = [val["shape"][str(i)] for i in range(len(val["shape"]))]
            chunks = [val["chunks"][str(i)].reshape(-1) for i in range(len(val["chunks"]))]
            out[name] = np.concatenate(chunks).reshape(shape)
        elif isinstance(val, dict):
            out.update(_flatten(val, name + "/"))
        else:
            out[name] = np.asarray(val)
    return out


def read_flax_msgpack(path):
    """Read a flax msgpack parameter file -> flat {'Module_0/Dense_0/kernel': array}."""
    try:
        import msgpack
    except ImportError as e:
        raise ImportError("convert.py needs the msgpack package: pip install msgpack") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected an official ema_params.msgpack)")
    try:
        with open(path, "rb") as f:
            tree = msgpack.unpackb(f.read(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable flax msgpack file ({e})") from e
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a parameter tree (dict), got {type(tree).__name__}")
    if "params" in tree and len(tree) == 1:        # tolerate a {'params': ...} wrapper
        tree = tree["params"]
    return _flatten(tree)


def read_artifact(folder):
    """An official release folder -> (metadata dict, flat params). See the module docstring."""
    meta_path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing; an official artifact folder holds "
                                "ema_params.msgpack and metadata.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:                                     # JSONDecodeError, bad UTF-8
        raise ValueError(f"{meta_path}: not valid JSON ({e}); download the artifact "
                         f"again") from e
    return meta, read_flax_msgpack(os.path.join(folder, "ema_params.msgpack"))


def read_flat_safetensors(path, kind=None):
    """A flat {'a/b/kernel': array} .safetensors (as tests/fixtures/gen_params.safetensors) ->
    (metadata, flat) like read_artifact; model_config and (unless given) kind from its metadata."""
    try:
        with safe_open(path, "np") as f:
            file_meta = f.metadata() or {}
    except Exception as e:                                      # safetensors' own error types
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    if "model_config" not in file_meta:
        raise ValueError(f"{path}: no model_config in the safetensors metadata")
    try:
        model_config = json.loads(file_meta["model_config"])
    except ValueError as e:
        raise ValueError(f"{path}: its model_config metadata is not valid JSON ({e})") from e
    return {"kind": kind or file_meta.get("kind"), "model_config": model_config}, load_file(path)


# ------------------------------------------------------------------------------------------
# Generator (kind "gen"): official DitGen -> our DriftDiT
# ------------------------------------------------------------------------------------------
# Official model_config keys (train._generator_model_config) by what we do with them.
_GEN_SAME = ("input_size", "in_channels", "out_channels", "patch_size", "hidden_size", "depth",
             "num_heads", "mlp_ratio", "cond_dim", "num_classes", "n_cls_tokens",
             "noise_classes", "noise_coords", "attn_fp32")
_GEN_RENAMED = {"use_remat": "grad_checkpoint"}
_GEN_MUST_BE_TRUE = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm")  # all released
_GEN_DROPPED = ("use_bf16",)  # precision is the caller's torch.autocast, not a model property


def gen_config_from_official(model_config):
    """Official DitGen model_config -> a dict for DriftDiTConfig. Raises on anything else."""
    cfg = {}
    for key, val in model_config.items():
        if key in _GEN_SAME:
            cfg[key] = val
        elif key in _GEN_RENAMED:
            cfg[_GEN_RENAMED[key]] = bool(val)
        elif key in _GEN_MUST_BE_TRUE:
            if val is not True:
                raise ValueError(f"model_config {key}={val!r} is not supported: DriftDiT is the "
                                 f"released architecture, which has {key}=True")
        elif key not in _GEN_DROPPED:
            raise ValueError(f"unknown generator model_config key {key!r} (value {val!r})")
    missing = [k for k in _GEN_SAME + _GEN_MUST_BE_TRUE if k not in model_config]
    if missing:
        raise ValueError(f"generator model_config lacks {missing}")
    return cfg


def gen_name_map(depth, n_style):
    """Our state_dict name -> official flat name. TorchLinear wraps one nn.Dense ('Dense_0')
    whose kernel is [in, out], the transpose of nn.Linear.weight; Embed tables are as is."""
    L, F = "LightningDiT_0/", "LightningDiT_0/FinalLayer_0/"
    m = {"y_embed.weight": "Embed_0/embedding", "alpha_norm.weight": "RMSNorm_0/weight",
         "pos_embed": L + "pos_embed", "cls_embed": L + "cls_embed",
         "final.norm.weight": F + "RMSNorm_0/weight"}
    m.update({f"style_embeds.{i}.weight": f"noise_embeds_{i}/embedding" for i in range(n_style)})
    dense = {"alpha_mlp.0": "TimestepEmbedder_0/TorchLinear_0", "x_embed": L + "TorchLinear_0",
             "alpha_mlp.2": "TimestepEmbedder_0/TorchLinear_1", "cls_proj": L + "TorchLinear_1",
             "final.adaLN": F + "TorchLinear_0", "final.linear": F + "TorchLinear_1"}
    for i in range(depth):
        ours, b = f"blocks.{i}.", f"{L}blocks_{i}/"
        m[ours + "norm1.weight"] = b + "RMSNorm_0/weight"
        m[ours + "norm2.weight"] = b + "RMSNorm_1/weight"
        m[ours + "attn.q_norm.weight"] = b + "Attention_0/q_norm/weight"
        m[ours + "attn.k_norm.weight"] = b + "Attention_0/k_norm/weight"
        dense.update({ours + "attn.qkv": b + "Attention_0/TorchLinear_0",
                      ours + "attn.proj": b + "Attention_0/TorchLinear_1",
                      ours + "mlp.w1": b + "SwiGLUFFN_0/TorchLinear_0",
                      ours + "mlp.w3": b + "SwiGLUFFN_0/TorchLinear_1",
                      ours + "mlp.w2": b + "SwiGLUFFN_0/TorchLinear_2",
                      ours + "adaLN": b + "TorchLinear_0"})
    for ours, theirs in dense.items():
        m[ours + ".weight"] = theirs + "/Dense_0/kernel"
        m[ours + ".bias"] = theirs + "/Dense_0/bias"
    return m


def convert_gen(model_config, flat):
    """Official (model_config, flat params) -> our DriftDiT holding those weights (eval mode)."""
    cfg = gen_config_from_official(model_config)
    try:
        with torch.device("meta"):  # names and shapes only; the weights come from `flat`
            model = DriftDiT.from_config(cfg)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"model_config {model_config} does not build a DriftDiT: {e}") from e
    want = model.state_dict()
    names = gen_name_map(model.cfg.depth, len(model.style_embeds))
    assert set(names) == set(want), "gen_name_map out of sync with DriftDiT"
    missing = [t for t in names.values() if t not in flat]
    extra = sorted(set(flat) - set(names.values()))
    if missing or extra:
        raise ValueError(f"official generator tensors do not match model_config: "
                         f"missing {missing}, unexpected {extra}")
    sd = {}
    for ours, theirs in names.items():
        a = np.asarray(flat[theirs], dtype=np.float32)
        a = a.T if theirs.endswith("/kernel") else a                    # [in, out] -> [out, in]
        if tuple(a.shape) != tuple(want[ours].shape):
            raise ValueError(f"official tensor {theirs} has shape {tuple(flat[theirs].shape)}; "
                             f"our {ours} needs {tuple(want[ours].shape)} (after transposing "
                             f"Dense kernels)")
        sd[ours] = torch.from_numpy(np.array(a, order="C"))             # a writable copy
    model.load_state_dict(sd, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------
# Feature encoder (kind "mae"): official MAEResNetJAX -> our encoder.MAEResNet
# ------------------------------------------------------------------------------------------
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def official_to_torch_name(name):
    """'encoder/stages_1/layers_0/proj_gn/scale' -> 'encoder.stages.1.0.proj_gn.weight'. Our
    modules carry the official names, so only the stage/block lists and leaves are renamed."""
    name = re.sub(r"stages_(\d+)/layers_(\d+)", r"stages.\1.\2", name)
    *path, leaf = name.split("/")
    return ".".join(path + [_LEAF.get(leaf, leaf)])


def _to_torch(a):
    t = torch.from_numpy(np.array(a, dtype=np.float32))        # copy: msgpack arrays are read-only
    if t.ndim == 4:                                             # conv kernel HWIO -> OIHW
        return t.permute(3, 2, 0, 1).contiguous()
    return t.t().contiguous() if t.ndim == 2 else t             # Dense [in, out] -> [out, in]


@torch.no_grad()
def load_official_mae_params(model, flat):
    """Copy official flat params {'encoder/conv1/kernel': array, ...} into `model`: the whole
    encoder, the decoder and fc all or none (encoder-only trees). Raises ValueError naming every
    unknown, missing or misshaped tensor; returns the names left at their init."""
    own = model.state_dict()
    errors, new = [], {}
    for name, a in flat.items():
        name = name.removeprefix("params/")
        key = official_to_torch_name(name)
        if key not in own:
            errors.append(f"unexpected {name} (-> {key}): not a tensor of this MAEResNet")
            continue
        t = _to_torch(a)
        if t.shape != own[key].shape:
            errors.append(f"shape of {name}: {tuple(np.shape(a))} -> {tuple(t.shape)}, "
                          f"expected {tuple(own[key].shape)} for {key}")
        new[key] = t
    for part in ("encoder.", "decoder.", "fc."):
        want = [k for k in own if k.startswith(part)]
        got = [k for k in want if k in new]
        if (part == "encoder." or got) and len(got) < len(want):
            errors += [f"missing {k} ({part[:-1]} must be complete)" for k in want if k not in new]
    if errors:
        raise ValueError("official MAE params do not fit MAEResNet:\n  " + "\n  ".join(errors))
    for key, t in new.items():
        own[key].copy_(t)                                       # state_dict shares storage
    return sorted(set(own) - set(new))


def mae_from_official(model_config, flat):
    """(metadata['model_config'], flat params) -> MAEResNet, with decoder and head if present."""
    heads = any(k.removeprefix("params/").startswith(("decoder/", "fc/")) for k in flat)
    with torch.device("meta"):  # skip the random init of up to 2.7B params: all overwritten below
        model = MAEResNet(MAEConfig(**model_config), with_heads=heads)
    left = load_official_mae_params(model.to_empty(device="cpu"), flat)
    if left:
        raise ValueError(f"official MAE params lack {left} (decoder and fc come together)")
    return model.eval()


# ------------------------------------------------------------------------------------------
# Dispatch on metadata["kind"] and the command line
# ------------------------------------------------------------------------------------------
# kind -> (official (model_config, flat params) -> our module, writer of our weights file).
# "mae" is the feature encoder (its `encoder/` subtree, plus the decoder and head if present).
CONVERTERS = {"gen": (convert_gen, save_checkpoint),
              "mae": (mae_from_official, partial(save_checkpoint, kind="mae"))}


def convert(meta, flat):
    """(metadata, flat params) from read_artifact / read_flat_safetensors -> our module."""
    kind = meta.get("kind")
    if kind not in CONVERTERS:
        raise ValueError(f"unknown artifact kind {kind!r}; convert.py knows {sorted(CONVERTERS)}")
    if not meta.get("model_config"):
        raise ValueError(f"artifact metadata has no model_config (kind {kind!r})")
    return CONVERTERS[kind][0](meta["model_config"], flat)


def main(argv=None):
    parser = argparse.ArgumentParser(description="official JAX artifact -> OUT/model.safetensors")
    parser.add_argument("--artifact", required=True,
                        help="official folder or flat .safetensors with model_config metadata")
    parser.add_argument("--kind", choices=sorted(CONVERTERS), help="kind of a flat .safetensors")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT/model.safetensors (e.g. a training run's)")
    args = parser.parse_args(argv)
    path = os.path.join(args.out, "model.safetensors")
    if os.path.exists(path) and not args.overwrite:             # checked before any work
        parser.error(f"--out {args.out} already holds {path} (a training run or an earlier "
                     f"conversion); pass a new --out, or --overwrite to replace its weights")
    if not os.path.exists(args.artifact):
        raise FileNotFoundError(f"--artifact {args.artifact}: no such folder or file (an "
                                f"official artifact folder or a flat .safetensors)")
    meta, flat = (read_artifact(args.artifact) if os.path.isdir(args.artifact)
                  else read_flat_safetensors(args.artifact, args.kind))
    model = convert(meta, flat)
    os.makedirs(args.out, exist_ok=True)
    CONVERTERS[meta["kind"]][1](model, path, source=os.path.abspath(args.artifact),
                                official_metadata=json.dumps(meta))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.artifact} ({meta['kind']}, {n:,} params) -> {path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:             # a message, not a traceback
        sys.exit(f"convert.py: error: {e}")
