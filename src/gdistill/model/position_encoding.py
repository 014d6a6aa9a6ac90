"""Sine positional encoding for 2D feature maps (DETR / Mask2Former style)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of the (y, x) position of every pixel of a feature map.

    With ``normalize=True`` the cumulative row/column index (1..H, 1..W over valid pixels) is
    divided by the last valid index and multiplied by ``scale``, so positions lie in (0, scale].
    Channel ``2i`` of each half is ``sin(p / T^(2i/F))`` and channel ``2i+1`` is
    ``cos(p / T^(2i/F))`` with ``F = num_pos_feats``, ``T = temperature``. The first half of the
    output channels encodes y, the second half x.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] (only its shape, device and dtype are used); mask: bool [B, H, W],
        True on padding. Returns [B, 2 * num_pos_feats, H, W] in x's dtype."""
        b, _, h, w = x.shape
        if mask is None:
            not_mask = torch.ones(b, h, w, device=x.device, dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[..., None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return pos.to(x.dtype)
