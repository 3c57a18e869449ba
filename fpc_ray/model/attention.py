"""Attention blocks that refine the backbone's last feature map (NCHW in, same shape out).

``se``, ``eca`` and ``cbam`` are timm's own layers, made by timm's ``create_attn``; ``mhsa``
(timm has nothing like it) is multi-head self-attention over the spatial tokens with a fixed
2-D sine-cosine position code, so it works at any input size.
"""

from __future__ import annotations

import torch
from timm.layers import create_attn
from torch import nn

from fpc_ray.config import AttentionConfig


def sincos_position_2d(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """A (height*width, dim) sine-cosine code: a quarter of the channels each for sin/cos of y/x."""
    if dim % 4:
        raise ValueError(f"position code needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.reshape(-1, 1) * omega
    x = xs.reshape(-1, 1) * omega
    code = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return code.to(dtype) if dtype is not None else code


class SpatialSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the HxW tokens of a feature map, with a residual.

    The channels are projected to ``dim`` for the attention and back, and the output projection
    starts at zero, so at initialisation the block is the identity and leaves pretrained
    features untouched.
    """

    def __init__(self, channels: int, dim: int = 256, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim = dim
        self.proj_in = nn.Conv2d(channels, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.proj_out = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)  # B, HW, dim
        tokens = tokens + sincos_position_2d(h, w, self.dim, x.device, tokens.dtype)
        tokens = self.norm(tokens)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        out = out.transpose(1, 2).reshape(b, self.dim, h, w)
        return x + self.proj_out(out)


def create_attention(cfg: AttentionConfig, channels: int) -> nn.Module:
    """Map ``cfg.type`` to a module over ``channels`` feature channels."""
    if cfg.type == "none":
        return nn.Identity()
    if cfg.type == "mhsa":
        return SpatialSelfAttention(channels, dim=cfg.dim, heads=cfg.heads)
    # se and cbam reduce the channels by cfg.reduction; ECA picks its 1-D kernel from the
    # channel count (gamma=2, beta=1 as in the paper).
    rd_ratio = 1.0 / cfg.reduction
    timm_kwargs = {"se": {"rd_ratio": rd_ratio}, "eca": {}, "cbam": {"rd_ratio": rd_ratio}}
    if cfg.type not in timm_kwargs:
        raise ValueError(f"unknown attention type {cfg.type!r}")
    return create_attn(cfg.type, channels, **timm_kwargs[cfg.type])

