"""Tests of data.py's image side: the ImageNet-layout folder reader, the ADM center crop and the
pixel models' RandomResizedCrop, and the on-demand ImageFolder source (the latent cache made from
such a folder: tests/test_cache.py). The images are small generated PNG/JPEG files. Also the
MNIST-5k csv reader's error messages."""
import gzip
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import ImageFolder, center_crop_arr, image_folder, random_resized_crop, to_tensor

SIZE = 32                       # crop size of the tests (the paper: 256)


def picture(seed, w, h):
    """A random RGB picture whose left and right halves differ (so a flip changes it)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[:, : w // 2, 0] = 255
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/<wnid>/<file>: 3 classes (folder names out of sorted order on purpose), PNG and JPEG
    files of several sizes, and one corrupt JPEG in class n02. -> (root, readable paths)."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    good = []
    for k, wnid in enumerate(["n03", "n01", "n02"]):
        os.makedirs(root / wnid)
        for i in range(3):
            ext = ".JPEG" if i % 2 == 0 else ".png"
            path = root / wnid / f"{wnid}_{i}{ext}"
            picture(10 * k + i, 40 + 13 * i, 36 + 7 * k).save(path)
            good.append(str(path))
    (root / "n02" / "n02_9.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return str(root), sorted(good)


# ------------------------------------------------------------------------------------------
# Folder reader and crops
# ------------------------------------------------------------------------------------------
def test_image_folder_order_and_labels(folder):
    """Class index = sorted folder order (the ImageNet-1k label order for train/), files sorted."""
    root, good = folder
    paths, labels, classes = image_folder(root)
    assert classes == ["n01", "n02", "n03"]
    assert len(paths) == 10 and paths == sorted(paths)          # the corrupt file is listed
    assert [os.path.basename(os.path.dirname(p)) for p in paths] == \
        [classes[i] for i in labels.tolist()]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        image_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class folders"):
        image_folder(str(tmp_path))
    os.makedirs(tmp_path / "n01")
    picture(0, 8, 8).save(tmp_path / "n01" / "a.png")
    os.makedirs(tmp_path / "n02")
    (tmp_path / "n02" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="n02.*has no images"):
        image_folder(str(tmp_path))


def test_center_crop_is_adm():
    """Short side to `size` (after box halvings while it is >= 2 size), then the central square:
    a 1100 x 600 picture whose outer 200-pixel strips left and right are pure red loses them."""
    a = np.zeros((600, 1100, 3), dtype=np.uint8)
    a[:, :200] = a[:, -200:] = (255, 0, 0)
    a[:, 200:-200] = (0, 0, 255)
    out = center_crop_arr(Image.fromarray(a), 256)
    assert out.size == (256, 256)
    arr = np.array(out).astype(int)
    assert arr[..., 0].max() < 5 and arr[..., 2].min() > 250    # only the blue centre is kept
    small = center_crop_arr(picture(0, 50, 30), 32)             # upscaling path
    assert small.size == (32, 32)


def test_random_resized_crop():
    """Same generator state -> same crop; full-area square crop of a square = a plain resize;
    the crops differ from draw to draw."""
    im = picture(3, 64, 64)
    a = random_resized_crop(im, SIZE, torch.Generator().manual_seed(5))
    b = random_resized_crop(im, SIZE, torch.Generator().manual_seed(5))
    c = random_resized_crop(im, SIZE, torch.Generator().manual_seed(6))
    assert a.size == (SIZE, SIZE) and np.array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(c))
    full = random_resized_crop(im, SIZE, torch.Generator(), scale=(1, 1), ratio=(1, 1))
    assert np.array_equal(np.array(full), np.array(im.resize((SIZE, SIZE), Image.BICUBIC)))


def test_image_folder_source(folder):
    """Pixel source: (n, 3, S, S) in [-1, 1], flips drawn from the generator (repeatable), and a
    corrupt file replaced by a readable image of its own class, with a warning naming it."""
    root, _ = folder
    src = ImageFolder(root, SIZE, workers=2)
    idx = torch.arange(len(src))
    x = src.get(idx, torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, src.get(idx, torch.Generator().manual_seed(0)))
    bad = [i for i, p in enumerate(src.paths) if p.endswith("n02_9.JPEG")][0]
    with pytest.warns(UserWarning, match="n02_9.JPEG"):
        y = src.get(torch.tensor([bad]), torch.Generator().manual_seed(0))
    same_class = [i for i in range(len(src)) if src.labels[i] == src.labels[bad] and i != bad]
    plain = [to_tensor(center_crop_arr(Image.open(src.paths[i]).convert("RGB"), SIZE))
             for i in same_class]
    assert any(torch.equal(y[0], p) or torch.equal(y[0], p.flip(2)) for p in plain)
    aug = ImageFolder(root, SIZE, augment=True, workers=2).get(idx, torch.Generator())
    assert aug.shape == x.shape and not torch.equal(aug, x)


def test_class_with_no_readable_image_fails_at_construction(tmp_path):
    """A class folder whose files all fail to decode is named when the source is built, not at
    the training step that first draws it (a class with one readable file is fine)."""
    for wnid, files in (("n01", ["a.png"]), ("n02", ["b.JPEG", "c.png"])):
        os.makedirs(tmp_path / wnid)
        for name in files:
            (tmp_path / wnid / name).write_bytes(b"not an image")
    picture(0, 8, 8).save(tmp_path / "n01" / "b.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="n02'? has no readable image"):
        ImageFolder(str(tmp_path), SIZE, workers=2)


# ------------------------------------------------------------------------------------------
# MNIST-5k csv
# ------------------------------------------------------------------------------------------
def write_csv(path, lines):
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in lines) + "\n")


@pytest.mark.parametrize("column, value, match", [
    (5, "abc", "line 3, column 5 holds 'abc'"),
    (9, 300, "line 3, column 9 holds '300'"),
    (785, -1, "line 3, column 785 holds '-1'"),
    (None, None, "line 3 has 700 columns"),
])
def test_mnist5k_names_the_first_bad_entry(tmp_path, monkeypatch, column, value, match):
    """A bad value or a short row is reported by line, column and value; a good file is read by
    the fast numpy parse alone (the slow scan never runs)."""
    rows = [[i % 256] * 784 + [i % 10] for i in range(4)]
    write_csv(tmp_path / "good.csv.gz", rows)
    with monkeypatch.context() as m:
        m.setattr(data, "_first_bad_entry", None)               # calling it would fail
        images, labels = data.mnist5k(str(tmp_path / "good.csv.gz"))
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3]
    if column is None:
        rows[2] = rows[2][:700]
    else:
        rows[2][column - 1] = value
    write_csv(tmp_path / "bad.csv.gz", rows)
    with pytest.raises(ValueError, match=f"bad.csv.gz: expected .* but {match}"):
        data.mnist5k(str(tmp_path / "bad.csv.gz"))


def test_distinct_draws_of_a_large_set_without_a_permutation():
    """data._choose: up to 2^16 items, the first k of a permutation (what the docs' MNIST runs
    drew); above, k distinct indices from uniform draws: in range, distinct, the same for the
    same generator state, and uniform (each of 8 position bins of the first index holds
    1/8 of 4000 draws within 5 standard deviations; the mean index n/2 within 1%)."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(data._choose(4500, 4, a), torch.randperm(4500, generator=b)[:4])
    n, g = 2 ** 17 + 3, torch.Generator().manual_seed(0)
    draws = torch.stack([data._choose(n, 8, g) for _ in range(4000)])          # (4000, 8)
    assert draws.min() >= 0 and draws.max() < n
    assert all(len(set(row.tolist())) == 8 for row in draws)
    counts = torch.bincount(draws[:, 0] * 8 // n, minlength=8).double()
    assert ((counts - 500).abs() < 5 * math.sqrt(500 * 7 / 8)).all(), counts
    assert abs(draws.double().mean() / n - 0.5) < 0.01
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(data._choose(n, 32, g1), data._choose(n, 32, g2))
    assert len(set(data._choose(100_000, 60_000, g).tolist())) == 60_000     # redraws


def test_prefetch_gives_each_steps_own_draw():
    """data.Prefetch: the draw of step s made one step ahead on a thread is the draw of step
    s (draw_groups depends on the step only), in order, after a skip, and again."""
    from models import DriftDiT_models, DriftDiTConfig
    cfg = DriftDiTConfig(**DriftDiT_models["S4"])
    sampler = data.TensorSampler(torch.randn(60, 1, 28, 28), torch.arange(60) % 10, 0)
    draw = lambda step: data.draw_groups(sampler, cfg, step, range(2), seed=0, n_classes=4,
                                         n_gen=3, n_pos=2, n_unc=2, cfg_power=3.0,
                                         no_cfg_frac=0.0)
    ahead = data.Prefetch(draw, torch.device("cpu"))
    for step in (0, 1, 2, 5, 6, 6):
        assert all(torch.equal(a, b) for a, b in zip(ahead.get(step), draw(step))), step
