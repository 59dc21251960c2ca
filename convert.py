"""
Convert the official JAX release artifacts (lambertae/drifting) into our checkpoints.

An official artifact is a folder with `ema_params.msgpack` (flax.serialization.msgpack_serialize
of the bare parameter tree) and `metadata.json` (`kind`, `model_config`, ...). We read the
msgpack with the plain `msgpack` package (no JAX / flax needed) and rename the flax leaves to
our PyTorch state_dict names.

    python convert.py --artifact path/to/gen_artifact --out runs/official_L2

Paper: Generative Modeling via Drifting, arXiv:2602.04770.
"""
import json
import os

import numpy as np

# ------------------------------------------------------------------------------------------
# Reading flax msgpack without flax
# ------------------------------------------------------------------------------------------
# flax.serialization stores every array as a msgpack ExtType. The codes and payloads below are
# flax's (flax/serialization.py, _MsgpackExtType): ndarray = 1 with payload
# msgpack((shape, dtype_name, raw_bytes)), native complex = 2, numpy scalar = 3 with payload
# msgpack((dtype_name, raw_bytes)). Leaves over 2**30 bytes are split into a dict marked
# "__msgpack_chunked_array__" holding the shape and a list of flat chunks.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


def _np_dtype(name):
    # bfloat16 is not a numpy dtype; we widen it to float32 exactly (it is the top half).
    return np.dtype("uint16") if name == "bfloat16" else np.dtype(name)


def _decode(name, buf):
    arr = np.frombuffer(buf, dtype=_np_dtype(name))
    if name == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _ext_hook(code, data):
    import msgpack
    if code == _EXT_NDARRAY:
        shape, dtype, buf = msgpack.unpackb(data)
        return _decode(dtype, buf).reshape(shape)
    if code == _EXT_NPSCALAR:
        dtype, buf = msgpack.unpackb(data)
        return _decode(dtype, buf)[0]
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    raise ValueError(f"unknown flax msgpack extension type {code}")


def _flatten(tree, prefix=""):
    """Nested dict -> {'a/b/c': np.ndarray}, re-joining flax's chunked large arrays."""
    out = {}
    for key, val in tree.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict) and val.get("__msgpack_chunked_array__"):
            # flax stores the shape and the chunk list as {"0": ..., "1": ...} dicts
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
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, strict_map_key=False)
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
    with open(meta_path) as f:
        meta = json.load(f)
    return meta, read_flax_msgpack(os.path.join(folder, "ema_params.msgpack"))
