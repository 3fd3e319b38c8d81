"""The trainable connector: vision patch features -> LLM-sized visual tokens.

    (M, P, Dv) --LayerNorm?--> Perceiver resampler (N latents) --> 2-layer GELU MLP --> (M, N, H)

`kind="mlp"` skips the resampler (one token per patch, LLaVA-1.5 style).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Latents attend to [patches; latents] (Flamingo's resampler), then a feed-forward."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler dim {dim} is not divisible by resampler heads {heads}")
        self.heads = heads
        self.norm_latents, self.norm_media = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False), \
            nn.Linear(dim, dim, bias=False)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        m, n, d = latents.shape
        q_in = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(media), q_in], dim=1)                 # (M, P+N, D)
        q = self.q(q_in).view(m, n, self.heads, -1).transpose(1, 2)              # (M, h, N, d)
        k, v = self.kv(kv_in).view(m, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)                           # (M, h, N, d)
        latents = latents + self.out(attn.transpose(1, 2).reshape(m, n, d))
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """N learned latent queries attending to a variable number of patches."""

    def __init__(self, dim_in: int, dim: int, num_latents: int, depth: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim ** -0.5)
        self.proj_in = nn.Linear(dim_in, dim) if dim_in != dim else nn.Identity()
        self.layers = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (M, P, Din)
        x = self.proj_in(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm_out(latents)                                            # (M, N, D)


class Connector(nn.Module):
    """LayerNorm? -> resampler? -> MLP projector. `config` holds what rebuilds it."""

    def __init__(self, vision_dim: int, llm_dim: int, kind: str = "resampler", num_latents: int = 64,
                 depth: int = 2, heads: int = 8, resampler_dim: int | None = None,
                 use_layernorm: bool = True):
        super().__init__()
        if kind not in ("resampler", "mlp"):
            raise ValueError(f"connector kind must be 'resampler' or 'mlp', got {kind!r}")
        self.config = dict(vision_dim=vision_dim, llm_dim=llm_dim, kind=kind, num_latents=num_latents,
                           depth=depth, heads=heads, resampler_dim=resampler_dim,
                           use_layernorm=use_layernorm)
        self.norm = nn.LayerNorm(vision_dim) if use_layernorm else nn.Identity()
        width = vision_dim
        if kind == "resampler":
            width = resampler_dim or vision_dim
            self.resampler = PerceiverResampler(vision_dim, width, num_latents, depth, heads)
        else:
            self.resampler = None
        self.projector = nn.Sequential(nn.Linear(width, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def num_tokens(self, num_patches: int) -> int:
        """Visual tokens per item for a given number of patches."""
        return self.config["num_latents"] if self.resampler is not None else num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:                   # (M, P, Dv)
        x = self.norm(features)
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)                                                 # (M, N, H)
