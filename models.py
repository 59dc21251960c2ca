"""
Generators for Drifting Models: f(noise) -> sample in one step.

- `MLP`: the toy 2-D generator of the official notebook (32-d noise, 3 x 256 SiLU, 2-d out).
- `DriftDiT`: the class-conditional image generator (paper Sec. 4 / A.2; official
  `models/generator.py`, `DitGen` + `LightningDiT`), number-for-number with the official JAX
  release in float32 (tests/test_models.py checks golden outputs). Sizes: `DriftDiT_models`.
  Its API is NCHW, noise (B, C, H, W) -> sample (B, C, H, W); the official code is NHWC, and
  we patchify to its token and patch-vector order, so converted weights work unchanged.

Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2).
Demo:  python models.py            # every preset's size + a forward shape check
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Shapes: B batch; C channels; H, W sample size; p patch side; g = H / p patches per side;
#         T = g * g patch tokens; K in-context class tokens; N = K + T; D width; Dc cond width;
#         h heads; hd = D / h head dim; M style codebooks (noise_coords). MLP: Z noise, D out.

ALPHA_EMBED_SCALE = 0.02  # c += 0.02 * RMSNorm(MLP(sincos(alpha))): official DitGen
ALPHA_FREQ_DIM = 256      # sinusoidal features of alpha (DiT's timestep embedder size)
MAX_PERIOD = 10_000.0     # sincos base for alpha, the 2-D pos-embed, and RoPE theta
NORM_EPS = 1e-6           # every RMSNorm (official)
INIT_STD = 0.02           # embeddings, class-token embedding, alpha MLP weights


# ------------------------------------------------------------------------------------------
# Toy 2-D generator
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Noise (B, Z) -> point (B, D). The toy generator of Sec. 5.1 / Fig. 3-4."""
    def __init__(self, noise_dim=32, hidden=256, depth=3, out_dim=2):
        super().__init__()
        self.noise_dim = noise_dim
        dims = [noise_dim] + [hidden] * depth                   # Linear + SiLU per hidden layer
        layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))

    def forward(self, noise):
        return self.net(noise)                                    # (B, D)


# ------------------------------------------------------------------------------------------
# DriftDiT helpers and layers
# ------------------------------------------------------------------------------------------
def sincos_1d(dim, pos):
    """pos (L,) -> (L, dim) as [sin | cos], frequencies 1 / 1e4^(i / (dim/2)) (MAE form)."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    ang = pos.double()[:, None] * omega[None]                    # (L, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=1)              # (L, dim)


def sincos_2d(dim, g):
    """The initial value of the learnable pos-embed: (T, dim), tokens in row-major (h, w).
    As the official (MAE) code, the FIRST half encodes the column w, the second the row h."""
    assert dim % 4 == 0, "2-D sincos needs D divisible by 4"
    row, col = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")  # (g, g) each
    emb = torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], 1)
    return emb.float()                                           # (T, D)


def alpha_features(alpha):
    """CFG scale alpha (B,) -> (B, 256) [cos | sin]: the official TimestepEmbedder of raw alpha."""
    half = ALPHA_FREQ_DIM // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=alpha.device) / half)
    ang = alpha.float()[:, None] * freqs[None]                   # (B, 128)
    return torch.cat([ang.cos(), ang.sin()], dim=1)              # (B, 256)


def rope_cos_sin(n_tokens, hd, device):
    """1-D RoPE tables over the token index 0..N-1 (class tokens first, then patches).
    NOTE: LightningDiT uses 2-D axial RoPE; the official Drifting code is 1-D, so are we."""
    inv_freq = 1.0 / MAX_PERIOD ** (torch.arange(0, hd, 2, device=device) / hd)   # (hd/2,)
    ang = torch.arange(n_tokens, device=device).float()[:, None] * inv_freq[None]  # (N, hd/2)
    ang = torch.cat([ang, ang], dim=1)                           # (N, hd)
    # NOTE: always float32. The official code builds these in bf16 when attn_fp32 is off,
    # which rounds positions > 256 (bf16 has 8 mantissa bits); we do not copy that.
    return ang.cos(), ang.sin()                                  # (N, hd) each


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (GPT-NeoX form, the official apply_rope): pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)                                  # (B, h, N, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin          # (B, h, N, hd)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32, returned in the input dtype (official)."""
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return (x32 * self.weight).to(x.dtype)                   # (..., dim)


class AdaLN(nn.Linear):
    """c -> Linear(SiLU(c)), always in float32 with autocast off: the official code computes
    the modulation in fp32 "to avoid bf16 precision loss". Zero-initialized (adaLN-zero).
    NOTE: the official then casts shift/scale/gate to bf16 (use_bf16); we keep them fp32."""
    def forward(self, c):
        with torch.autocast(c.device.type, enabled=False):
            return F.linear(F.silu(c.float()), self.weight.float(), self.bias.float())


class Attention(nn.Module):
    """MHSA with qkv bias, per-head QK RMSNorm, 1-D RoPE, scale 1/sqrt(hd)."""
    def __init__(self, D, num_heads, attn_fp32):
        super().__init__()
        self.h, self.attn_fp32 = num_heads, attn_fp32
        self.qkv = nn.Linear(D, 3 * D)
        self.q_norm, self.k_norm = RMSNorm(D // num_heads), RMSNorm(D // num_heads)
        self.proj = nn.Linear(D, D)

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, D // self.h)   # (B, N, 3, h, hd) as official
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)           # (B, h, N, hd) each
        q = apply_rope(self.q_norm(q), cos, sin)                 # (B, h, N, hd)
        k = apply_rope(self.k_norm(k), cos, sin)                 # (B, h, N, hd)
        if self.attn_fp32:   # official `attn_fp32`: logits + softmax in fp32 under bf16
            with torch.autocast(x.device.type, enabled=False):
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            o = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))    # (B, N, D)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), all with biases (official SwiGLUFFN)."""
    def __init__(self, D, hidden):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(D, hidden), nn.Linear(D, hidden), nn.Linear(hidden, D)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))          # (B, N, D)


class DriftDiTBlock(nn.Module):
    """LightningDiT-style block: pre-RMSNorm, adaLN-zero modulation from c, gated residuals."""
    def __init__(self, D, num_heads, mlp_ratio, cond_dim, attn_fp32):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(D), RMSNorm(D)
        self.attn = Attention(D, num_heads, attn_fp32)
        self.mlp = SwiGLU(D, (int(2 / 3 * int(D * mlp_ratio)) + 31) // 32 * 32)  # official width
        self.adaLN = AdaLN(cond_dim, 6 * D)

    def forward(self, x, c, cos, sin):
        mod = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)         # 6 x (B, 1, D), fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, cos, sin)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)  # (B, N, D)


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN (shift, scale) -> zero-init Linear(D -> p*p*C_out)."""
    def __init__(self, D, cond_dim, out_dim):
        super().__init__()
        self.norm, self.adaLN = RMSNorm(D), AdaLN(cond_dim, 2 * D)
        self.linear = nn.Linear(D, out_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).unsqueeze(1).chunk(2, dim=-1)   # (B, 1, D) each
        return self.linear(self.norm(x) * (1 + scale) + shift)       # (B, N, p*p*C_out)


# ------------------------------------------------------------------------------------------
# DriftDiT
# ------------------------------------------------------------------------------------------
@dataclass
class DriftDiTConfig:
    input_size: int        # H = W of noise and sample
    in_channels: int       # C of the noise (= out_channels: noise has the output's shape)
    out_channels: int      # C of the sample
    patch_size: int        # p; input_size % p == 0
    hidden_size: int       # D
    depth: int             # blocks
    num_heads: int         # h
    mlp_ratio: float       # SwiGLU width: 2/3 * D * mlp_ratio, rounded up to a multiple of 32
    cond_dim: int          # Dc, width of the conditioning vector c
    num_classes: int       # rows of the class embedding (no null class: CFG is alpha-conditioned)
    n_cls_tokens: int      # K in-context class tokens
    noise_classes: int     # entries per style codebook (0 = no style embeddings)
    noise_coords: int      # M style codebooks
    attn_fp32: bool = True         # attention in fp32 under bf16 autocast (official flag)
    grad_checkpoint: bool = False  # recompute blocks in backward (official `use_remat`)


class DriftDiT(nn.Module):
    """x = f_theta(eps | y, alpha): noise eps (B, C, H, W), labels y (B,), CFG scale alpha ->
    sample x (B, C, H, W) in one step (Sec. 4, A.2), the sample itself (no residual on the noise).
    c = E_cls[y] + sum_m E_m[u_m] + 0.02 RMSNorm(MLP(sincos(alpha))), u_m ~ U{0..noise_classes-1}
    drawn at EVERY forward (train and inference; A.2 "style embeddings"). Tokens: K class tokens
    Linear(c) + e_k, then T patch tokens; adaLN-zero blocks; the class tokens are dropped."""
    def __init__(self, cfg: DriftDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, Dc, p = cfg.hidden_size, cfg.cond_dim, cfg.patch_size
        assert cfg.input_size % p == 0, f"input_size {cfg.input_size} not divisible by p={p}"
        assert D % cfg.num_heads == 0 and (D // cfg.num_heads) % 2 == 0, "need even head dim"
        assert cfg.n_cls_tokens >= 1, "need in-context class tokens (the official configs: 16)"
        self.g = cfg.input_size // p
        self.y_embed = nn.Embedding(cfg.num_classes, Dc)
        M = cfg.noise_coords if cfg.noise_classes > 0 else 0    # style codebooks
        self.style_embeds = nn.ModuleList(nn.Embedding(cfg.noise_classes, Dc) for _ in range(M))
        self.alpha_mlp = nn.Sequential(nn.Linear(ALPHA_FREQ_DIM, Dc), nn.SiLU(), nn.Linear(Dc, Dc))
        self.alpha_norm = RMSNorm(Dc)
        self.x_embed = nn.Linear(p * p * cfg.in_channels, D)
        # NOTE: a learnable Parameter initialized to sincos (official); DiT's is a frozen buffer.
        self.pos_embed = nn.Parameter(sincos_2d(D, self.g)[None])          # (1, T, D)
        self.cls_proj = nn.Linear(Dc, D)
        self.cls_embed = nn.Parameter(torch.zeros(1, cfg.n_cls_tokens, D))  # (1, K, D)
        self.blocks = nn.ModuleList(DriftDiTBlock(D, cfg.num_heads, cfg.mlp_ratio, Dc,
                                                  cfg.attn_fp32) for _ in range(cfg.depth))
        self.final = FinalLayer(D, Dc, p * p * cfg.out_channels)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: dict):
        return cls(DriftDiTConfig(**config))

    def reset_parameters(self):
        """The official init: xavier-uniform linears with zero bias, N(0, 0.02) embeddings and
        alpha-MLP weights, zero adaLN and output projection => the output is exactly 0 at init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
        for w in self.alpha_mlp[0].weight, self.alpha_mlp[2].weight, self.cls_embed:
            nn.init.normal_(w, std=INIT_STD)
        for m in [b.adaLN for b in self.blocks] + [self.final.adaLN, self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def draw_style(self, B, generator=None, device=None):
        """Style indices u (B, M), uniform; drawn on the generator's device, then moved."""
        u = torch.randint(self.cfg.noise_classes, (B, len(self.style_embeds)), generator=generator,
                          device=generator.device if generator is not None else device)
        return u.to(device)                                      # (B, M)

    def condition(self, labels, alpha, style_idx=None, generator=None):
        """c (B, Dc). alpha: float or tensor () / (B,). style_idx (B, M): drawn if None."""
        B = labels.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=labels.device).expand(B)
        c = self.y_embed(labels)                                 # (B, Dc)
        if style_idx is None and len(self.style_embeds):
            style_idx = self.draw_style(B, generator, labels.device)
        for m, E in enumerate(self.style_embeds):
            c = c + E(style_idx[:, m])                           # (B, Dc)
        a = self.alpha_norm(self.alpha_mlp(alpha_features(alpha)))   # (B, Dc)
        return c + ALPHA_EMBED_SCALE * a                         # (B, Dc)

    def patchify(self, x):
        B, C = x.shape[:2]
        p, g = self.cfg.patch_size, self.g
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)   # (B, g_h, g_w, p_h, p_w, C)
        return x.reshape(B, g * g, p * p * C)                    # (B, T, p*p*C) official order

    def unpatchify(self, x):
        B, p, g, C = x.shape[0], self.cfg.patch_size, self.g, self.cfg.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)   # (B, C, g_h, p_h, g_w, p_w)
        return x.reshape(B, C, g * p, g * p)                     # (B, C, H, W)

    def forward(self, noise, labels, alpha, style_idx=None, generator=None):
        """noise (B, C, H, W), labels (B,) int, alpha float or (B,) -> sample (B, C, H, W)."""
        cfg = self.cfg
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        assert tuple(noise.shape[1:]) == want, f"noise {tuple(noise.shape)}, expected (B, *{want})"
        c = self.condition(labels, alpha, style_idx, generator)  # (B, Dc)
        # NOTE: under bf16 autocast the fp32 pos_embed promotes the residual stream to fp32
        # (PyTorch AMP practice); the official use_bf16 model keeps it in bf16. The matmuls
        # are bf16 in both; tests/test_models.py bounds the difference.
        x = self.x_embed(self.patchify(noise)) + self.pos_embed  # (B, T, D)
        cls = self.cls_proj(c)[:, None] + self.cls_embed         # (B, K, D)
        x = torch.cat([cls, x], dim=1)                           # (B, N, D)
        cos, sin = rope_cos_sin(x.shape[1], cfg.hidden_size // cfg.num_heads, x.device)
        remat = cfg.grad_checkpoint and torch.is_grad_enabled()  # official `use_remat`
        for block in self.blocks:
            x = (checkpoint(block, x, c, cos, sin, use_reentrant=False) if remat
                 else block(x, c, cos, sin))                     # (B, N, D)
        x = self.final(x, c)[:, cfg.n_cls_tokens:]               # (B, T, p*p*C_out)
        return self.unpatchify(x)                                # (B, C, H, W)

    def generate(self, labels, alpha, generator=None):
        """Draw noise eps ~ N(0, I) of the output's shape (temp 1) and map it to samples."""
        cfg, gdev = self.cfg, generator.device if generator is not None else labels.device
        shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
        noise = torch.randn(shape, generator=generator, device=gdev).to(labels.device)
        return self(noise, labels, alpha, generator=generator)   # (B, C, H, W)


# ------------------------------------------------------------------------------------------
# EMA (DiT's): the weights sampling uses; checkpoints are checkpoint.py's
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def update_ema(ema, model, decay):
    """DiT's EMA, by parameter name, buffers copied; decay = 0 copies the model. ema = decay
    ema + (1 - decay) param, as one multi-tensor kernel per op (_foreach) on GPUs."""
    params = dict(model.named_parameters())
    mine = [p for _, p in ema.named_parameters()]
    torch._foreach_mul_(mine, decay)
    torch._foreach_add_(mine, [params[n].detach() for n, _ in ema.named_parameters()],
                        alpha=1 - decay)
    buffers = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(buffers[name])


# ------------------------------------------------------------------------------------------
# Presets (params: `python models.py`; B/L checked against the official configs by the tests)
# ------------------------------------------------------------------------------------------
# Every preset keeps the official ImageNet recipe (configs/gen/*.yaml); the S presets only
# shrink width and depth so that a batch-64 training step takes about a second on a CPU.
_RECIPE = dict(mlp_ratio=4.0, n_cls_tokens=16, noise_classes=64, noise_coords=32)
_LATENT = dict(input_size=32, in_channels=4, out_channels=4, patch_size=2, num_classes=1000)
_PIXEL = dict(input_size=256, in_channels=3, out_channels=3, patch_size=16, num_classes=1000)
_MNIST = dict(input_size=28, in_channels=1, out_channels=1, patch_size=4, num_classes=10)
_S = dict(hidden_size=128, depth=4, num_heads=4, cond_dim=128)
_B = dict(hidden_size=768, depth=12, num_heads=12, cond_dim=768)
_L = dict(hidden_size=1024, depth=24, num_heads=16, cond_dim=1024)
DriftDiT_models = {  # the official latent/pixel_sota_{B,L}.yaml set attn_fp32 and use_remat
    "S2": {**_S, **_LATENT, **_RECIPE, "attn_fp32": True, "grad_checkpoint": False},   # 1.7M
    "S4": {**_S, **_MNIST, **_RECIPE, "attn_fp32": True, "grad_checkpoint": False},    # 1.6M
    "S8": {**_S, **_PIXEL, "input_size": 64, "patch_size": 8, **_RECIPE, "attn_fp32": True,
           "grad_checkpoint": False},                     # 1.8M: 64x64 pixels, CPU smoke runs
    "B2": {**_B, **_LATENT, **_RECIPE, "attn_fp32": False, "grad_checkpoint": False},  # 132.7M
    "L2": {**_L, **_LATENT, **_RECIPE, "attn_fp32": False, "grad_checkpoint": False},  # 462.9M
    "B16": {**_B, **_PIXEL, **_RECIPE, "attn_fp32": True, "grad_checkpoint": True},    # 133.9M
    "L16": {**_L, **_PIXEL, **_RECIPE, "attn_fp32": True, "grad_checkpoint": True},    # 464.5M
}


if __name__ == "__main__":
    mlp = MLP()
    x = mlp(torch.randn(5, mlp.noise_dim))
    print(f"MLP: {sum(p.numel() for p in mlp.parameters()):,} params, (5, 32) -> {tuple(x.shape)}")
    for name, preset in DriftDiT_models.items():
        c = DriftDiTConfig(**preset)
        with torch.device("meta"):  # counts without allocating (L16 is 1.9 GB in fp32)
            n = sum(p.numel() for p in DriftDiT(c).parameters())
        print(f"DriftDiT {name:4s} {n / 1e6:7.2f}M params | {c.input_size}x{c.input_size}x"
              f"{c.in_channels} p{c.patch_size} D{c.hidden_size} depth {c.depth} heads "
              f"{c.num_heads} | tokens {c.n_cls_tokens}+{(c.input_size // c.patch_size) ** 2}")
    torch.manual_seed(0)
    model = DriftDiT(DriftDiTConfig(**DriftDiT_models["S2"]))
    cfg = model.cfg
    noise = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(noise, torch.randint(cfg.num_classes, (4,)), torch.empty(4).uniform_(1, 4))
    print(f"S2: noise {tuple(noise.shape)} -> sample {tuple(out.shape)}, "
          f"max |sample| {out.abs().max():.1f} (exactly 0 at init: adaLN-zero)")
