"""
The one checkpoint format of this repo (the run folder that holds it: runfolder.py).

A checkpoint is ONE model.safetensors: tensors by state_dict name, the EMA under "ema/", a
training run's optimizer and per-rank RNG states under "train/"; metadata {"kind", "config":
JSON, "sha256": {tensor: digest}, "train": JSON of the rest of the train state, "args",
"step"}. No pickle anywhere: a checkpoint is tensors and JSON. Written through a temp file,
fsync and rename (the previous file stands until the new one is whole), verified on read (every
tensor against its recorded sha256, finite). Kinds: "gen" (models.DriftDiT), "mae"
(encoder.MAEResNet), "mlp" (toy.py); written by train.py, toy.py and convert.py, read by
sample.py, fid.py, ablate.py and train.py --resume. FSDP runs write the same whole file.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2); the official code's
utils/ckpt_util.py keeps flax msgpack files instead (convert.py reads those).
"""
import hashlib
import json
import math
import os
import sys
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
    """Write `model`'s weights (+ `ema`'s under "ema/"; each a module or its state dict) and
    config (default: the model's config dataclass) to one file, `path`. A training run also
    passes `train_state` (optimizer state, step, RNG states, history: tensors under "train/",
    the rest as JSON), so weights and state can never be from different steps. Every tensor's
    sha256 goes into the metadata. Refuses non-finite tensors (a poisoned checkpoint is worse
    than none). Atomic: written to path.tmp, fsynced, renamed over `path`, the folder
    fsynced; until the rename the previous file stands, and any failure (full disk, Ctrl-C)
    removes the temp and keeps it."""
    from safetensors.torch import save_file  # lazy: models.py itself needs only torch
    weights = lambda m: m if isinstance(m, dict) else m.state_dict()    # a module or its state
    sd = {k: v.detach().contiguous().cpu() for k, v in weights(model).items()}
    if ema is not None:
        sd.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in weights(ema).items()})
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()), 0)
    if bad:
        raise FloatingPointError(f"{path}: not written, tensor {bad!r} holds NaN or inf")
    config = asdict(model.cfg) if config is None else config
    metadata = {"kind": kind, "config": json.dumps(config), **{k: str(v) for k, v in meta.items()}}
    if train_state is not None:
        metadata["train"] = json.dumps(pack(train_state, "train", sd))
    metadata["sha256"] = json.dumps({k: tensor_sha256(v) for k, v in sd.items()})
    metadata["meta_sha256"] = metadata_sha256(metadata)         # and the JSON around them
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
    fsync_folder(folder)                                # and the rename itself is durable


def metadata_sha256(metadata):
    """sha256 of every metadata string but its own: the args, step, history and tensor
    digests are verified like the tensors (one edited character changes it)."""
    rest = {k: v for k, v in metadata.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_metadata(path):
    """A run folder or .safetensors file -> (file path, its metadata with "config", "args"
    and "train" parsed from JSON), verified against its meta_sha256. Errors name the file."""
    from safetensors import safe_open
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(path, "pt") as f:
            raw = dict(f.metadata() or {})
        meta = {k: json.loads(v) if k in ("config", "args", "train", "sha256", "data") else v
                for k, v in raw.items()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    if "sha256" not in raw or "meta_sha256" not in raw:
        raise ValueError(f"{path}: no recorded checksums (sha256, meta_sha256): not written by "
                         f"this code's checkpoint.save_checkpoint (or by a version before "
                         f"metadata checksums); nothing in it can be verified, so it is not loaded")
    if metadata_sha256(raw) != raw["meta_sha256"]:
        raise ValueError(f"{path}: its metadata (args, step, history, digests) does not match "
                         f"its recorded meta_sha256: the file was edited or is corrupt; use "
                         f"another checkpoint")
    return path, meta


def file_sha256(path, name="model.safetensors"):
    """sha256 of a weights file's bytes (a folder: its `name`), None for no path: the identity
    of frozen weights that carry no recorded digests (ConvNeXt's transformers file)."""
    if path is None:
        return None
    path = os.path.join(path, name) if os.path.isdir(path) else path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path):
    """The identity of a checkpoint's weights: sha256 of its recorded tensor digests (each
    verified whenever the weights are read), so a run can record which frozen encoder it saw."""
    return hashlib.sha256(json.dumps(read_metadata(path)[1]["sha256"], sort_keys=True)
                          .encode()).hexdigest()


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
    sums, sd = meta["sha256"], {}
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if set(keys) != set(sums):
                raise ValueError(f"tensors {sorted(set(keys) ^ set(sums))[:3]} have no recorded "
                                 f"sha256 or are missing: the file was edited; use another "
                                 f"checkpoint")
            pick = "ema/" if ema and any(k.startswith("ema/") for k in keys) else ""
            for k in keys:
                if ema is None or (k.startswith(pick) and (pick or not k.startswith(("ema/",
                                                                                  "train/")))):
                    sd[k if ema is None else k[len(pick):]] = t = f.get_tensor(k)
                    if tensor_sha256(t) != sums[k]:
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
    now = {k: json.loads(meta[k]) for k in ("config", "data")}
    for name in ("mae_sha256", "convnext_sha256"):     # the frozen encoders, by identity
        if strict and saved.get("data", {}).get(name) != now["data"].get(name):
            raise ValueError(f"--resume: the {name[:-7]} weights ({now['data'][name[:-7]]}, "
                             f"sha256 {str(now['data'].get(name))[:12]}) are not the ones "
                             f"{run_dir} was trained with (sha256 "
                             f"{str(saved.get('data', {}).get(name))[:12]}); pass those, or "
                             f"--change-args to go on with these")
    for key in ("config", "data") if strict else ("config",):
        if saved.get(key) != now[key]:
            raise ValueError(f"--resume: {run_dir} has {key} {saved.get(key)}, but this run has "
                             f"{meta[key]}; pass the flags it was trained with or a new --out")
    mine, ema_mine = raw.state_dict(), ema.state_dict()        # FSDP: this rank's shards
    try:
        raw.load_state_dict({k: like(v, mine.get(k)) for k, v in tensors.items()
                             if not k.startswith(("ema/", "train/"))})
        ema.load_state_dict({k[4:]: like(v, ema_mine.get(k[4:])) for k, v in tensors.items()
                             if k.startswith("ema/")})
    except RuntimeError as e:                           # a tensor of another shape or name
        raise ValueError(f"--resume: {run_dir}: its weights do not fit this run's model "
                         f"({str(e).splitlines()[-1].strip()}); pass a new --out") from e
    return unpack(saved["train"], tensors)


def read_train_state(path):
    """A train.py checkpoint (run folder or file) -> its train state as saved: optimizer,
    step, per-rank RNG states, history (the logged averages)."""
    path, meta = read_metadata(path)
    _, tensors, meta = read_checkpoint(path, meta.get("kind"), ema=None)
    return unpack(meta["train"], tensors)


def write_atomic(out, write):
    """write(tmp) to a temp file beside `out` (hidden, .NAME.tmp.EXT: no user file's name;
    out's extension, which np.savez and PIL go by; a killed write's is reused by the next),
    then rename it over `out`: an error or Ctrl-C midway leaves no partial file and any
    previous `out` as it was."""
    folder, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# A training run: FSDP shards, resume (weights, optimizer, per-rank RNG), the save
# ------------------------------------------------------------------------------------------
def sharded(t):
    """An FSDP shard (a DTensor)? Asked without importing torch.distributed.tensor (~1 s):
    until train.shard imports it, nothing is one."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(t, tensor.DTensor)


def full(t, keep=True, device=None):
    """An FSDP shard (DTensor) -> the whole tensor, all-gathered (every rank takes part), on
    `device` where keep, None elsewhere; another tensor as it is."""
    t = t.full_tensor() if sharded(t) else t
    return t.to(device) if keep else None


def like(t, ref):
    """A whole tensor -> this rank's shard of it if ref is an FSDP shard (no communication)."""
    if not (sharded(ref) and t.shape == ref.shape):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


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
    this rank's random streams restored when the run had as many ranks -> (step, history,
    the partial sums of a log row that a stop interrupted, or None)."""
    state = load_training_checkpoint(run_dir, raw, ema, meta, strict=strict)
    params = [p for group in opt.param_groups for p in group["params"]]   # FSDP: AdamW's m, v
    state["optimizer"]["state"] = {i: {k: like(v, params[i]) for k, v in moments.items()}
                                   for i, moments in state["optimizer"]["state"].items()}
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
    return state["step"], state["history"], state.get("pending")



def check_update(raw, ema, loss_after, done, ddp, device):
    """Before a save: the update must have left usable weights, every weight and EMA tensor
    finite and the updated weights' loss on this step's batch finite (weights of 1e30 are
    finite, their next loss is not). fork_rng: the check takes no random numbers from the
    run's streams, so a resumed run stays exact. -> what is wrong, or None."""
    with torch.no_grad(), torch.random.fork_rng([device] if device.type == "cuda" else []):
        after = loss_after().detach().float().reshape(1)
    weights = [*raw.state_dict().items(), *(("ema/" + k, t) for k, t in ema.state_dict().items())]
    local = lambda t: t.to_local() if sharded(t) else t     # FSDP: this rank's shard
    bad = [k for k, t in weights if t.is_floating_point() and not local(t).isfinite().all()]
    after = torch.cat([after, after.new_tensor([len(bad)])])  # [loss, this rank's bad tensors]
    if ddp:
        torch.distributed.all_reduce(after, op=torch.distributed.ReduceOp.AVG)
    if after[1] > 0 or not math.isfinite(after[0].item()):
        where = repr(bad[0]) if bad else "of another rank"
        return f"after the update of step {done}, " + (f"tensor {where} holds NaN or inf" if (
            after[1] > 0) else f"the weights give a loss of {after[0].item()} on the same batch")
    return None


def save_training(path, raw, ema, opt, step, meta, history, streams, world, device, loss_after,
                  pending=None):
    """train.py's save: after check_update, every rank's RNG states gathered and rank 0
    writes raw + EMA weights, optimizer, step, RNG states, history (and `pending`: a stop's
    partial log row, {sums, n}) as ONE checkpoint. -> None, or what is wrong with the
    weights (then nothing is written)."""
    bad = check_update(raw, ema, loss_after, step, world > 1, device)
    if bad:
        return bad
    rngs = rng_states(streams, device, world)                   # every rank's, for --resume
    master, optimizer = world == 1 or torch.distributed.get_rank() == 0, opt.state_dict()
    if any(map(sharded, raw.parameters())):                     # FSDP: gathered tensor by
        keep = lambda t: full(t, master, "cpu")                # tensor, kept by rank 0
        raw, ema = ({k: keep(v) for k, v in m.state_dict().items()} for m in (raw, ema))
        optimizer["state"] = {i: {k: keep(v) for k, v in moments.items()}
                              for i, moments in optimizer["state"].items()}
    if master:
        save_checkpoint(raw, path, meta["kind"], ema=ema, config=json.loads(meta["config"]),
                        step=step, args=meta["args"], data=meta["data"], train_state=dict(
                            optimizer=optimizer, step=step, rng=rngs, history=history,
                            **({} if pending is None else dict(pending=pending))))
    return None


def stopped(what, out, lr, saved_at):
    """The error of a run that went non-finite, saying where the last good checkpoint is."""
    ckpt = os.path.join(out, "model.safetensors")
    return FloatingPointError(f"{what}; stopped. " + (
        f"The last good checkpoint, {ckpt} (step {saved_at}), is untouched: resume it with "
        f"a lower lr or clip, e.g. python train.py --resume --out {out} --lr {lr / 10:g} "
        f"--change-args" if saved_at else
        "No checkpoint was written: start again with a lower --lr or --clip"))
