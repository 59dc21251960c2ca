"""
The one checkpoint format of this repo, and the run folder that holds it.

A checkpoint is ONE model.safetensors: tensors by state_dict name, the EMA under "ema/", a
training run's optimizer and per-rank RNG states under "train/"; metadata {"kind", "config":
JSON, "sha256": {tensor: digest}, "train": JSON of the rest of the train state, "args",
"step"}. No pickle anywhere: a checkpoint is tensors and JSON. Written through a temp file,
fsync and rename (the previous file stands until the new one is whole), verified on read (every
tensor against its recorded sha256, finite). Kinds: "gen" (models.DriftDiT), "mae"
(encoder.MAEResNet), "mlp" (toy.py); written by train.py, toy.py and convert.py, read by
sample.py, fid.py, ablate.py and train.py --resume.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2); the official code's
utils/ckpt_util.py keeps flax msgpack files instead (convert.py reads those).
"""
import hashlib
import json
import math
import os
from dataclasses import asdict

import torch


# ------------------------------------------------------------------------------------------
# The file: tensors + JSON metadata, every tensor checksummed
# ------------------------------------------------------------------------------------------
def tensor_sha256(t):
    """sha256 of a tensor's bytes (any dtype): what the metadata records and loads verify."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                          ).hexdigest()


def pack(obj, prefix, tensors):
    """Nested dicts/lists holding tensors -> JSON-able tree; each tensor goes to `tensors`
    under its path and is named in the tree. Dicts become [key, value] pairs, so the
    optimizer's integer keys come back as integers. `unpack` inverts it."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, pack(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unpack(tree, tensors):
    if isinstance(tree, dict) and "tensor" in tree:
        return tensors[tree["tensor"]]
    if isinstance(tree, dict):
        return {k: unpack(v, tensors) for k, v in tree["dict"]}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


def save_checkpoint(model, path, kind="gen", ema=None, config=None, train_state=None,
                    **meta):
    """Write `model`'s weights (+ `ema`'s under "ema/") and config (default: the model's
    config dataclass) to one file, `path`. A training run also passes `train_state` (optimizer
    state, step, RNG states, history: tensors under "train/", the rest as JSON), so weights
    and state can never be from different steps. Every tensor's sha256 goes into the metadata.
    Refuses non-finite tensors (a poisoned checkpoint is worse than none). Atomic: written to
    path.tmp, fsynced, renamed over `path`, the folder fsynced; until the rename the previous
    file stands, and any failure (full disk, Ctrl-C) removes the temp and keeps it."""
    from safetensors.torch import save_file  # lazy: models.py itself needs only torch
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        sd.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()), 0)
    if bad:
        raise FloatingPointError(f"{path}: not written, tensor {bad!r} holds NaN or inf")
    config = asdict(model.cfg) if config is None else config
    metadata = {"kind": kind, "config": json.dumps(config), **{k: str(v) for k, v in meta.items()}}
    if train_state is not None:
        metadata["train"] = json.dumps(pack(train_state, "train", sd))
    metadata["sha256"] = json.dumps({k: tensor_sha256(v) for k, v in sd.items()})
    tmp, folder = f"{path}.tmp", os.path.dirname(os.path.abspath(path))
    try:
        save_file(sd, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())                        # the bytes are on disk ...
        os.replace(tmp, path)                           # ... before the name points at them
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise OSError(f"{path}: could not write the checkpoint ({e}); the previous file, if "
                          f"any, is untouched") from e
        raise                                           # Ctrl-C, SystemExit: as they are
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)                                    # and the rename itself is durable
    finally:
        os.close(fd)


def read_metadata(path):
    """A run folder or .safetensors file -> (file path, its metadata with "config", "args"
    and "train" parsed from JSON). Errors name the file."""
    from safetensors import safe_open
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
        for key in ("config", "args", "train", "sha256", "data"):
            if key in meta:
                meta[key] = json.loads(meta[key])
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    return path, meta


def read_checkpoint(path, kind, ema=True, device="cpu"):
    """A run folder holding model.safetensors, or the file -> (config dict, state_dict, meta).
    ema=True: the EMA weights when the file has them (sampling and the frozen encoder use the
    EMA, as the official code); False: the raw weights; None: every tensor (EMA under "ema/",
    train state under "train/"). Each tensor read is checked against the sha256 recorded at
    save time (a flipped bit is named, not loaded) and must be finite."""
    from safetensors import safe_open
    path, meta = read_metadata(path)
    if meta.get("kind") != kind or "config" not in meta:
        raise ValueError(f"{path}: holds kind={meta.get('kind')!r}, expected {kind!r} weights")
    sums, sd = meta.get("sha256", {}), {}
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            pick = "ema/" if ema and any(k.startswith("ema/") for k in keys) else ""
            for k in keys:
                if ema is None or (k.startswith(pick) and (pick or not k.startswith(("ema/",
                                                                                  "train/")))):
                    sd[k if ema is None else k[len(pick):]] = t = f.get_tensor(k)
                    if k in sums and tensor_sha256(t) != sums[k]:
                        raise ValueError(f"tensor {k!r} does not match its recorded sha256: "
                                         f"the file is corrupt; use another checkpoint")
                    if t.is_floating_point() and not t.isfinite().all():
                        raise ValueError(f"tensor {k!r} holds NaN or inf")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return meta["config"], {k: v.to(device) for k, v in sd.items()}, meta


def load_training_checkpoint(run_dir, raw, ema, meta, strict=True):
    """A run folder written by train.py -> raw and EMA weights loaded in place (verified), and
    its train state returned. Refuses a checkpoint without train state, or whose kind or model
    config differ from this run's `meta` (or its data, when strict)."""
    _, tensors, saved = read_checkpoint(run_dir, meta["kind"], ema=None)
    if "train" not in saved:
        raise ValueError(f"--resume: {run_dir} holds weights only (no optimizer state): not a "
                         f"train.py checkpoint; pass a new --out")
    for key in ("config", "data") if strict else ("config",):
        if saved.get(key) != json.loads(meta[key]):
            raise ValueError(f"--resume: {run_dir} has {key} {saved.get(key)}, but this run has "
                             f"{meta[key]}; pass the flags it was trained with or a new --out")
    raw.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(("ema/", "train/"))})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    return unpack(saved["train"], tensors)


def read_train_state(path):
    """A train.py checkpoint (run folder or file) -> its train state as saved: optimizer,
    step, per-rank RNG states, history (the logged averages)."""
    path, meta = read_metadata(path)
    _, tensors, meta = read_checkpoint(path, meta.get("kind"), ema=None)
    return unpack(meta["train"], tensors)


def write_atomic(out, write):
    """write(tmp) to a temp file of out's extension, then rename it over `out`: an error or
    Ctrl-C midway leaves no partial file and any previous `out` as it was."""
    root, ext = os.path.splitext(out)
    tmp = f"{root}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------
# A training run: resume (weights, optimizer, per-rank RNG) and the run folder
# ------------------------------------------------------------------------------------------
def rng_states(streams, device, world):
    """This rank's random streams (its data sampler's, torch's, CUDA's) -> the list over all
    ranks that the checkpoint keeps (all_gather under DDP), so a resumed run draws what an
    uninterrupted one would."""
    rng = {k: v.state_dict() for k, v in streams.items()}      # this rank's data stream,
    rng["torch"] = torch.get_rng_state()                        # masks and dropout
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [rng] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng)
    return rngs


def resume_run(run_dir, raw, ema, opt, meta, streams, rank, world, device, strict=True):
    """--resume: weights, EMA and optimizer state loaded in place from run_dir (verified), and
    this rank's random streams restored when the run had as many ranks -> (step, history)."""
    state = load_training_checkpoint(run_dir, raw, ema, meta, strict=strict)
    opt.load_state_dict(state["optimizer"])
    if len(state["rng"]) == world:                              # this rank's streams go on
        torch.set_rng_state(state["rng"][rank]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"][rank]:      # not if saved on CPU
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
        for k, v in streams.items():
            v.load_state_dict(state["rng"][rank][k])
    elif streams and rank == 0:
        print(f"NOTE: saved with {len(state['rng'])} ranks, resumed on {world}: fresh data "
              f"and mask streams, not an exact continuation")
    if rank == 0:
        print(f"resumed {run_dir} at step {state['step']}")
    return state["step"], state["history"]


def check_run_folder(out, resume, overwrite):
    """Refuse to start a run in a folder that holds another one, unless told which to do."""
    if not resume and not overwrite and any(os.path.exists(os.path.join(out, f)) for f in (
            "model.safetensors", "log.txt")):
        raise ValueError(f"--out {out} holds another run; pass --resume to continue it, "
                         f"--overwrite to replace it, or a new --out")


def prepare_run_folder(out, resume, overwrite, start, snapshots):
    """Rank 0, once every input has been checked: the folder made, an --overwrite'n run's
    checkpoint removed, a save killed half-way cleaned up, a fresh log (or, resuming, the
    log rows after the checkpoint's step dropped: those steps rerun)."""
    ckpt, log, jsonl = (os.path.join(out, f) for f in ("model.safetensors", "log.txt",
                                                          "log.jsonl"))
    os.makedirs(out, exist_ok=True)
    if overwrite and not resume and os.path.exists(ckpt):
        os.remove(ckpt)                                         # --overwrite: the old run goes
    if os.path.exists(ckpt + ".tmp"):
        os.remove(ckpt + ".tmp")                                # a save killed half-way
    if snapshots:
        os.makedirs(os.path.join(out, "snapshots"), exist_ok=True)
    if not resume:
        open(log, "w").close()                                  # a fresh run, a fresh log
    rows = open(jsonl).readlines() if resume and os.path.exists(jsonl) else []
    with open(jsonl, "w") as f:                                 # rows after the checkpoint go:
        f.writelines(r for r in rows if json.loads(r)["step"] <= start)       # they rerun


def check_update(raw, ema, loss_after, done, ddp, device):
    """Before a save: the update must have left usable weights, every weight and EMA tensor
    finite and the updated weights' loss on this step's batch finite (weights of 1e30 are
    finite, their next loss is not). fork_rng: the check takes no random numbers from the
    run's streams, so a resumed run stays exact. -> what is wrong, or None."""
    with torch.no_grad(), torch.random.fork_rng([device] if device.type == "cuda" else []):
        after = loss_after().detach().float().reshape(1)
    if ddp:
        torch.distributed.all_reduce(after, op=torch.distributed.ReduceOp.AVG)
    weights = [*raw.state_dict().items(), *(("ema/" + k, t) for k, t in ema.state_dict().items())]
    bad = [k for k, t in weights if t.is_floating_point() and not t.isfinite().all()]
    if bad or not math.isfinite(after.item()):
        return f"after the update of step {done}, " + (
            f"tensor {bad[0]!r} holds NaN or inf" if bad else
            f"the weights give a loss of {after.item()} on the same batch")
    return None


def save_training(path, raw, ema, opt, step, meta, history, streams, world, device, loss_after):
    """train.py's save: after check_update, every rank's RNG states gathered and rank 0
    writes raw + EMA weights, optimizer, step, RNG states and history as ONE checkpoint.
    -> None, or what is wrong with the weights (then nothing is written)."""
    ddp = world > 1
    bad = check_update(raw, ema, loss_after, step, ddp, device)
    if bad:
        return bad
    rngs = rng_states(streams, device, world)                   # every rank's, for --resume
    if not ddp or torch.distributed.get_rank() == 0:
        save_checkpoint(raw, path, meta["kind"], ema=ema, step=step, args=meta["args"],
                        data=meta["data"], train_state=dict(optimizer=opt.state_dict(),
                                                            step=step, rng=rngs,
                                                            history=history))
    return None
