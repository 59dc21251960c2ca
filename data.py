"""
Data for Drifting Models.

- Toy 2-D distributions (Sec. 5.1, Fig. 3-4; the official toy notebook): `checkerboard`,
  `swiss_roll`, `bimodal`. Each is `sample(n, generator) -> (n, 2)` float32 points.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2).
Demo:  python data.py
"""
import math

import torch


# ------------------------------------------------------------------------------------------
# Toy 2-D distributions
# ------------------------------------------------------------------------------------------
def checkerboard(n, generator=None, noise=0.05):
    """The 8 dark cells of a 4x4 board on [-1, 1]^2, uniform inside each, + Gaussian noise
    (the official notebook's target: cells of side 0.5, noise 0.05)."""
    g = generator
    parity = torch.randint(0, 2, (n,), generator=g)                  # which diagonal family
    i = 2 * torch.randint(0, 2, (n,), generator=g) + parity          # column 0..3
    j = 2 * torch.randint(0, 2, (n,), generator=g) + parity          # row 0..3, i + j even
    cell = torch.stack([i, j], dim=1).float()                        # (n, 2)
    pts = (cell + torch.rand(n, 2, generator=g)) * 0.5 - 1.0         # (n, 2) in [-1, 1]^2
    return pts + noise * torch.randn(n, 2, generator=g)


def swiss_roll(n, generator=None, noise=0.03):
    """A 2-D spiral t (cos t, sin t), t in [pi/2, 9pi/2], scaled into [-1, 1] (the notebook's)."""
    t = math.pi * (0.5 + 4.0 * torch.rand(n, generator=generator))  # (n,)
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)   # (n, 2)
    # NOTE: the notebook divides by the batch's own max |coordinate|; we divide by its
    # population value (t = 9pi/2) so that every batch has the same scale.
    pts = pts / (4.5 * math.pi)                                      # (n, 2) in [-1, 1]^2
    return pts + noise * torch.randn(n, 2, generator=generator)


def bimodal(n, generator=None, std=0.2):
    """Two equal Gaussian modes at (-1, 0) and (1, 0): the target of the paper's Fig. 3."""
    side = 2.0 * torch.randint(0, 2, (n, 1), generator=generator).float() - 1.0
    centers = torch.cat([side, torch.zeros_like(side)], dim=1)       # (n, 2)
    return centers + std * torch.randn(n, 2, generator=generator)


TOY_DATA = {"checkerboard": checkerboard, "swiss_roll": swiss_roll, "bimodal": bimodal}


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    for name, sample in TOY_DATA.items():
        x = sample(10000, g)
        print(f"{name:12s} mean {x.mean(0).numpy().round(3)} std {x.std(0).numpy().round(3)} "
              f"range [{x.min():.2f}, {x.max():.2f}]")
