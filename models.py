"""
Generators for Drifting Models: f(noise) -> sample in one step.

- `MLP`: the toy 2-D generator of the official notebook (32-d Gaussian noise, 3 hidden layers
  of 256 with SiLU, 2-d output).

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2).
Demo:  python models.py
"""
import torch
import torch.nn as nn

# Shapes: B batch; Z noise dim; D output dim.


# ------------------------------------------------------------------------------------------
# Toy 2-D generator
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Noise (B, Z) -> point (B, D). The toy generator of Sec. 5.1 / Fig. 3-4."""

    def __init__(self, noise_dim=32, hidden=256, depth=3, out_dim=2):
        super().__init__()
        self.noise_dim = noise_dim
        layers, d = [], noise_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, noise):
        return self.net(noise)                                    # (B, D)


if __name__ == "__main__":
    mlp = MLP()
    x = mlp(torch.randn(5, mlp.noise_dim))
    print(f"MLP: {sum(p.numel() for p in mlp.parameters()):,} params, (5, 32) -> {tuple(x.shape)}")
