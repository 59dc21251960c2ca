r"""
The latent cache: every image of an ImageNet-layout folder and its horizontal flip, ADM center
crop, encoded once by the SD-VAE (vae.py) as a posterior sample x 0.18215 (official
dataset/latent.py) into OUT/shard_*.safetensors (latents (n, 2, 4, h, w) original/flip, labels,
index) + OUT/index.json. `LatentCache` reads it memory-mapped as a data.TensorSampler source.
`embed_all`: the frozen MAE's features of every real sample, once (train.py --cache-features).

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2).
8 GPUs (rerun the same command to resume: only missing shards are redone):
  torchrun --standalone --nproc_per_node=8 cache.py --images /data/imagenet/train \
      --vae sd-vae-ft-mse/diffusion_pytorch_model.safetensors --out /data/imagenet_latents
1 process (CPU or 1 GPU):  python cache.py --images DIR --vae FILE --out DIR
"""
import argparse
import hashlib
import json
import math
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from data import ImageFolder, center_crop_arr, image_folder, load_rgb, mnist5k, to_tensor
from encoder import ACTIVATION_KWARGS, feature_groups
from vae import VAE_SCALE, load_vae

CACHE_VERSION = "1"
CACHE_MAKE = ("torchrun --nproc_per_node=N cache.py --images IMAGENET/train "
              "--vae diffusion_pytorch_model.safetensors --out CACHE")


def shard_path(root, k):
    return os.path.join(root, f"shard_{k:05d}.safetensors")


def read_cache_index(root):
    path = os.path.join(root, "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no latent cache at {root!r} ({path} is missing); make one "
                                f"with: {CACHE_MAKE}")
    try:
        with open(path) as f:
            info = json.load(f)
    except ValueError as e:                                     # JSONDecodeError, bad UTF-8
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun the cache command "
                         f"({CACHE_MAKE}), which keeps the shards made with the same settings")
    n = info.get("num_shards") if isinstance(info, dict) else None
    if not (isinstance(n, int) and n >= 1 and isinstance(info.get("vae"), str)
            and isinstance(info.get("size"), int)):
        raise ValueError(f"{path}: not a cache index (num_shards {n!r}: a count >= 1, a vae "
                         f"name and a size expected); delete it and rerun the cache command "
                         f"({CACHE_MAKE}), which keeps the shards made with the same settings")
    return info


def mmap_safetensors(path):
    """A safetensors file as ({name: read-only np.memmap}, metadata), reading no tensor data:
    the format is an 8-byte little-endian header size, a JSON header (dtype, shape, byte range
    of each tensor) and the raw little-endian bytes."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:                        # read no header larger than the file
                raise ValueError(f"its header claims {n} bytes, the file has {size}")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {})
        arrays = {}
        for name, h in header.items():
            lo, hi = h["data_offsets"]
            if 8 + n + hi > size:
                raise ValueError(f"tensor {name} ends at byte {8 + n + hi} of {size}")
            arrays[name] = (np.memmap(path, dtypes[h["dtype"]], "r", offset=8 + n + lo,
                                      shape=tuple(h["shape"])) if hi > lo else
                            np.zeros(h["shape"], dtypes[h["dtype"]]))
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"latent cache shard {path} is corrupt ({e}); delete it and rerun "
                         f"the cache command, which redoes missing shards") from e
    return arrays, meta


def shard_skipped(root, k):
    """The files shard k skipped as unreadable (a JSON list in its metadata)."""
    path = shard_path(root, k)
    meta = mmap_safetensors(path)[1]
    try:
        return json.loads(meta["skipped"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: its 'skipped' metadata is missing or not valid JSON ({e}); "
                         f"delete the shard and rerun the cache command, which redoes it") from e


class LatentCache:
    """A TensorSampler source: `.labels` (N,) in memory, latents (N, 2, 4, h, w) memory-mapped;
    `.get(idx, generator)` -> (n, 4, h, w), each item's original or flip with p = 0.5 (official
    LatentDataset). `vae` / `size`, when given, must match what the cache was made with."""
    def __init__(self, root, vae=None, size=None):
        self.info = info = read_cache_index(root)
        for key, want in (("vae", vae), ("size", size)):
            if want is not None and info[key] != want:
                raise ValueError(f"latent cache {root!r} was made with {key} {info[key]!r}, "
                                 f"not {want!r}: make a new cache ({CACHE_MAKE})")
        missing = [k for k in range(info["num_shards"]) if not os.path.exists(shard_path(root, k))]
        if missing:
            raise FileNotFoundError(f"latent cache {root!r} is incomplete: {len(missing)} of "
                                    f"{info['num_shards']} shards missing (first: "
                                    f"{shard_path(root, missing[0])}); rerun the cache command, "
                                    f"it resumes")
        self.latents, labels = [], []
        for k in range(info["num_shards"]):
            arrays, meta = mmap_safetensors(shard_path(root, k))
            if meta.get("vae") != info["vae"] or meta.get("size") != str(info["size"]):
                raise ValueError(f"{shard_path(root, k)} was made with VAE {meta.get('vae')} "
                                 f"at size {meta.get('size')}, the rest of the cache with "
                                 f"{info['vae']} at {info['size']}: delete the shard and rerun")
            self.latents.append(arrays["latents"])              # (n_k, 2, 4, h, w) memmap
            labels.append(torch.from_numpy(np.array(arrays["labels"])))
        self.labels = torch.cat(labels)                         # (N,)
        self.offsets = np.cumsum([0] + [len(a) for a in self.latents])
        self.shape = tuple(self.latents[0].shape[2:])           # (4, h, w)

    def __len__(self):
        return len(self.labels)

    def get(self, idx, generator):
        flip = (torch.rand(len(idx), generator=generator) < 0.5).long().tolist()   # 0/1, not
        idx = idx.numpy()                                       # bools: numpy reads those as masks
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        rows, flip, out = idx - self.offsets[shard], np.array(flip), np.empty((len(idx),
                                                                             *self.shape), "f4")
        for s in np.unique(shard):                              # one fancy read per shard
            mine = shard == s
            out[mine] = self.latents[s][rows[mine], flip[mine]]
        return torch.from_numpy(out)                            # (n, 4, h, w) float32


@torch.no_grad()
def cache_latents(images, out, vae_path, size=256, shard_size=1024, batch=64, seed=0,
                  device="cpu", rank=0, world=1, workers=8):
    """Write the cache of folder `images` to `out`: the same posterior noise for an image and
    its flip (official create_cached_dataset), seeded per image (independent of world size and
    batch). Shard k goes to rank k % world, written whole and atomically: a rerun redoes only
    missing shards. Unreadable images are skipped (warned, listed in the shard's metadata)."""
    paths, labels, classes = image_folder(images)
    with open(vae_path, "rb") as f:             # names the VAE weights the cache was made with
        vae_id = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    info = dict(version=CACHE_VERSION, images=os.path.abspath(images), num_images=len(paths),
                classes=classes, size=size, vae=vae_id,
                shard_size=shard_size, num_shards=math.ceil(len(paths) / shard_size), seed=seed)
    os.makedirs(out, exist_ok=True)
    index = os.path.join(out, "index.json")
    if os.path.exists(index):
        old = read_cache_index(out)
        diff = [k for k in info if k != "images" and old.get(k) != info[k]]
        if diff:
            said = [f"{k}: {old.get(k)!r} vs {info[k]!r}" for k in diff if k != "classes"]
            said += ["other classes"] * ("classes" in diff)
            raise ValueError(f"{out!r} holds a cache made with other settings "
                             f"({', '.join(said)}); pass a new --out or delete it")
    else:                                                       # every rank writes the same
        with open(f"{index}.tmp{rank}", "w") as f:
            json.dump(info, f)
        os.replace(f"{index}.tmp{rank}", index)
    vae = load_vae(vae_path, device)
    todo = [k for k in range(rank, info["num_shards"], world)
            if not os.path.exists(shard_path(out, k))]
    bar = tqdm(total=sum(min(len(paths), (k + 1) * shard_size) - k * shard_size for k in todo),
               desc=f"cache (rank {rank})", disable=rank != 0, unit="img")
    with ThreadPoolExecutor(workers) as pool:
        for k in todo:
            latents, kept, skipped = [], [], []
            for lo in range(k * shard_size, min(len(paths), (k + 1) * shard_size), batch):
                ids = list(range(lo, min(lo + batch, len(paths), (k + 1) * shard_size)))
                loaded = dict(zip(ids, pool.map(lambda i: load_rgb(paths[i]), ids)))
                ok = [i for i in ids if loaded[i] is not None]
                skipped += [os.path.relpath(paths[i], images) for i in ids if loaded[i] is None]
                kept += ok
                bar.update(len(ids))
                if not ok:
                    continue
                x = torch.stack([to_tensor(center_crop_arr(loaded[i], size)) for i in ok])
                x = x.to(device)                                # (n, 3, size, size)
                mean, std = vae.posterior(torch.cat([x, x.flip(3)]))       # (2n, 4, h, w)
                eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator()
                                   .manual_seed(seed * 10 ** 9 + i)) for i in ok])
                z = (mean + std * eps.to(device).repeat(2, 1, 1, 1)) * VAE_SCALE
                latents.append(torch.stack(z.float().cpu().chunk(2), 1))   # (n, 2, 4, h, w)
            f = 2 ** (len(vae.cfg.channels) - 1)                  # 8 for the SD-VAE
            empty = torch.zeros(0, 2, vae.cfg.latent_channels, size // f, size // f)
            tensors = {"latents": torch.cat(latents) if latents else empty,   # (n, 2, 4, h, w)
                       "labels": labels[kept], "index": torch.tensor(kept, dtype=torch.long)}
            try:                                # a shard is whole or absent: rerun resumes
                save_file(tensors, shard_path(out, k) + ".tmp", dict(
                    version=CACHE_VERSION, vae=info["vae"], size=str(size), shard=str(k),
                    skipped=json.dumps(skipped)))
                os.replace(shard_path(out, k) + ".tmp", shard_path(out, k))
            except Exception as e:              # a full disk, above all
                if os.path.exists(shard_path(out, k) + ".tmp"):
                    os.remove(shard_path(out, k) + ".tmp")
                raise OSError(f"{shard_path(out, k)}: could not write the shard ({e}); free "
                              f"disk space and rerun the same command: the finished shards "
                              f"are kept") from e
    bar.close()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description="image folder -> SD-VAE latent cache (rerun to resume)")
    p.add_argument("--images", required=True, help="root/<class>/<image>, e.g. ILSVRC2012 train/")
    p.add_argument("--vae", required=True, help="stabilityai/sd-vae-ft-mse's .safetensors file")
    p.add_argument("--out", required=True, help="cache folder (index.json + shard_*.safetensors)")
    p.add_argument("--size", type=int, default=256, help="ADM center-crop size (latent: size/8)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    p.add_argument("--batch", type=int, default=64, help="images per VAE call (x2 with flips)")
    p.add_argument("--seed", type=int, default=0, help="posterior-sample noise seed")
    p.add_argument("--workers", type=int, default=8, help="image-decoding threads per rank")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if any), cpu, cuda")
    args = p.parse_args(argv)
    ddp = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    auto = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = auto if args.device == "auto" else args.device
    if ddp:                                     # only barriers: gloo serves any device
        import torch.distributed as dist
        dist.init_process_group("gloo")
    info = cache_latents(args.images, args.out, args.vae, args.size, args.shard_size, args.batch,
                         args.seed, device, rank, world, args.workers)
    if ddp:
        dist.barrier()                          # every rank's shards are written
    if rank == 0:
        cache = LatentCache(args.out)
        skipped = sum(len(shard_skipped(args.out, k)) for k in range(info["num_shards"]))
        disk = sum(os.path.getsize(shard_path(args.out, k)) for k in range(info["num_shards"]))
        print(f"latent cache {args.out}: {len(cache)} images x 2 flips of {cache.shape}, "
              f"{len(info['classes'])} classes, {skipped} unreadable files skipped, "
              f"{info['num_shards']} shards, {disk / 1e9:.3f} GB")
    if ddp:
        dist.destroy_process_group()


def open_data(data, path, image_size=256, augment=False):
    """train.py's --data: MNIST-5k in memory ("mnist5k"), the latent cache memory-mapped
    ("latents"), or an image folder decoded per draw ("images") -> (images, labels (N,), the
    shape of one sample)."""
    if data == "mnist5k":
        images, labels = mnist5k(path)
    else:
        images = (LatentCache(path) if data == "latents" else
                  ImageFolder(path, image_size, augment=augment))
        labels = images.labels
    shape = tuple(images.shape[1:]) if isinstance(images, torch.Tensor) else images.shape
    return images, labels, shape


@torch.no_grad()
def embed_all(phi, images, batch=250):
    """images (N, C, H, W) -> {name: (N, T, D)}: every feature group of every real sample
    once (train.py --cache-features), in batches; the frozen MAE in eval mode is deterministic."""
    parts = [feature_groups(phi, images[i:i + batch], **ACTIVATION_KWARGS)
             for i in range(0, len(images), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:          # a message naming the file, not a traceback
        sys.exit(f"cache.py: error: {e}")
