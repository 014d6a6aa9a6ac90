"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the stride
8 / 16 / 32 features, plus one FPN step to stride 4 for the per-pixel mask features.

Deformable attention (Zhu et al., Deformable DETR) is written in pure PyTorch, so it runs on
CPU and CUDA without compiled extensions: with ``F.grid_sample`` on CUDA and when traced or
exported, with sparse CSR products on a CPU (``model/csr_sampling.py``). Its linears are
``TokenLinear`` (``model/token_linear.py``): oneDNN instead of the BLAS on CPUs where that is faster.

Differences from Mask2Former that do not change the computation: no padding masks (every
location is valid, as in Mask2Former where the masks are all False), no dropout modules
(dropout is 0.0 there), and with ``num_layers=0`` the encoder, level embeddings and positional
encoding are not built at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.model.csr_sampling import csr_sample
from gdistill.model.position_encoding import PositionEmbeddingSine
from gdistill.model.token_linear import TokenLinear

SpatialShapes = Tensor | Sequence[tuple[int, int]]


def _shapes_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: [N, S, M, D] values of all levels flattened (row-major per level, levels
            concatenated), M heads of D channels.
        spatial_shapes: L (H_l, W_l) pairs, an int64 [L, 2] tensor or a list (a list avoids a
            device sync on CUDA).
        level_start_index: [L] start of each level in S (unused: derived from the shapes; kept
            for the familiar signature).
        sampling_locations: [N, Q, M, L, P, 2] normalised (x, y) in [0, 1] of each level's map;
            pixel centres sit at (i + 0.5) / size, outside points read zeros.
        attention_weights: [N, Q, M, L, P], typically softmax-normalised over (L, P).

    Returns:
        [N, Q, M * D]: for each query and head, the weighted sum of the bilinearly sampled values.
    """
    shapes = _shapes_list(spatial_shapes)
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {shapes} do not add up to {value.shape[1]} values")
    if value.device.type == "cpu" and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        # Sparse-matrix products: 1.6x faster than grid_sample on a CPU (BENCHMARKS.md); tracing
        # and ONNX export keep the plain grid_sample ops.
        return ms_deform_attn_csr(value, shapes, sampling_locations, attention_weights)
    return ms_deform_attn_grid_sample(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_csr(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn` as sparse CSR products (``model/csr_sampling.py``); CPU only."""
    n, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    out = csr_sample(
        value.permute(0, 2, 1, 3).reshape(n * m, s, d),
        sampling_locations.permute(0, 2, 1, 3, 4, 5).reshape(n * m, q, num_levels, p, 2),
        attention_weights.permute(0, 2, 1, 3, 4).reshape(n * m, q, num_levels, p),
        shapes,
    )  # [N*M*Q, D]
    return out.view(n, m, q, d).transpose(1, 2).reshape(n, q, m * d)


def ms_deform_attn_grid_sample(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn` with ``F.grid_sample`` (any device, traceable, exportable)."""
    n, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    # One [N*M, D, S] layout shared by all levels; each level is then a (strided) view.
    value = value.permute(0, 2, 3, 1).reshape(n * m, d, s)
    # Points-major grids [N*M, L, P, Q, 2]: grid_sample then returns [N*M, D, P, Q], so the
    # weighting runs over rows of Q contiguous values (vectorised) and reduces over an outer
    # dimension. (With the points innermost, [.., Q, P], the multiply and the sum over P = 4
    # values dominated the CPU time of this function.)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).reshape(n * m, num_levels, p, q, 2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(n * m, num_levels, p, q)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, grids, weights)):
        out = _WeightedGridSample.apply(value, grids, weights, tuple(shapes))  # [N*M, D, Q]
    else:  # inference, tracing and ONNX export: plain ops, no samples kept for a backward
        out = _weighted_grid_sample(value, grids, weights, shapes)[0]
    return out.view(n, m * d, q).transpose(1, 2)


class _WeightedGridSample(torch.autograd.Function):
    """out[b, :, q] = sum over levels l and points p of weights[b, l, p, q] times the bilinear
    sample of level l of ``value`` at grids[b, l, p, q].

    value [B, D, S] (levels flattened and concatenated); grids [B, L, P, Q, 2] in [-1, 1]
    (grid_sample convention, align_corners=False, zero padding); weights [B, L, P, Q].
    Returns [B, D, Q].

    The arithmetic of grid_sample + multiply + sum under autograd, written out so that the
    weighting runs one point at a time on cache-sized slices (see forward) and the backward
    calls grid_sample's backward kernel directly, without autograd's broadcasting bookkeeping.
    Once-differentiable.
    """

    @staticmethod
    def forward(ctx, value: Tensor, grids: Tensor, weights: Tensor, shapes: tuple) -> Tensor:
        out, sampled = _weighted_grid_sample(value, grids, weights, shapes)
        ctx.shapes = shapes
        ctx.save_for_backward(value, grids, weights, *sampled)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, grids, weights, *sampled = ctx.saved_tensors
        need_value, need_grids, need_weights = ctx.needs_input_grad[:3]
        grad_value = torch.empty_like(value) if need_value else None  # every level fills its slice
        grad_grids = torch.empty_like(grids) if need_grids else None
        grad_weights = torch.empty_like(weights) if need_weights else None
        go = grad_out.unsqueeze(2)  # [B, D, 1, Q]
        start = 0
        for lvl, value_l in enumerate(_level_views(value, ctx.shapes)):
            size = value_l.shape[-2] * value_l.shape[-1]
            if need_weights:
                for point in range(grids.shape[2]):
                    grad_weights[:, lvl, point] = (grad_out * sampled[lvl][:, :, point]).sum(1)
            if need_value or need_grids:
                grad_sampled = go * weights[:, lvl, None]  # [B, D, P, Q]
                g_value, g_grid = torch.ops.aten.grid_sampler_2d_backward(
                    grad_sampled, value_l, grids[:, lvl], 0, 0, False, [need_value, need_grids]
                )  # modes: 0 = bilinear, 0 = zero padding
                if need_value:
                    grad_value[:, :, start : start + size] = g_value.flatten(2)
                if need_grids:
                    grad_grids[:, lvl] = g_grid
            start += size
        return grad_value, grad_grids, grad_weights, None


def _weighted_grid_sample(
    value: Tensor, grids: Tensor, weights: Tensor, shapes: Sequence[tuple[int, int]]
) -> tuple[Tensor, list[Tensor]]:
    """The forward of :class:`_WeightedGridSample`: (out [B, D, Q], per-level samples
    [B, D, P, Q])."""
    out, sampled = None, []
    for lvl, value_l in enumerate(_level_views(value, shapes)):
        s_l = F.grid_sample(
            value_l, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B, D, P, Q]
        # One point at a time: a [B, D, Q] slice and the output stay in cache, where the
        # product of the whole [B, D, P, Q] tensor did not. R50 reference step: 4 ms -> 0.8 ms
        # per level and layer; the six layers' forward sampling 0.135 -> 0.050 s per step.
        for point in range(s_l.shape[2]):
            w = weights[:, lvl, point, None]
            out = s_l[:, :, point] * w if out is None else torch.addcmul(out, s_l[:, :, point], w)
        sampled.append(s_l)
    return out, sampled


def _level_views(value: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """value [B, D, S] -> one [B, D, H_l, W_l] view per level."""
    views, start = [], 0
    for h, w in shapes:
        views.append(value[:, :, start : start + h * w].view(value.shape[0], value.shape[1], h, w))
        start += h * w
    return views


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), 2-d reference points.

    forward(query [N, Q, C], reference_points [N or 1, Q, L, 2] normalised (x, y),
    input_flatten [N, S, C], spatial_shapes L (H, W) pairs) -> [N, Q, C].
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = TokenLinear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = TokenLinear(d_model, n_heads * n_levels * n_points)
        self.value_proj = TokenLinear(d_model, d_model)
        self.output_proj = TokenLinear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Head h starts with its points on a ray at angle 2*pi*h/heads, point k at distance k+1
        # (in units of the level's pixels, scaled so the larger coordinate is 1).
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        n, q, _ = query.shape
        s = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(n, s, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query)  # [N, Q, heads * levels * points * 2]
        weights = self.attention_weights(query).view(n, q, heads, levels * points)
        weights = weights.softmax(-1).view(n, q, heads, levels, points)
        # Offsets are in pixels of each level: divide by (W_l, H_l), written out for every
        # (head, level, point, x|y) so that the division runs along contiguous rows: the same
        # quotients, forward + backward 6.1 -> 2.7 ms per layer of the R50 reference step on a
        # CPU (a broadcast over the 6-d view vectorises badly), about 1 % of the step.
        divisor = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
        )
        divisor = divisor[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
        offsets = (offsets / divisor).view(n, q, heads, levels, points, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets
        out = ms_deform_attn(value, spatial_shapes, None, locations, weights)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: x = norm1(x + attn(x + pos)); x = norm2(x + ffn(x)); ReLU FFN."""

    def __init__(
        self, d_model: int, dim_feedforward: int, n_levels: int, n_heads: int, n_points: int
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = TokenLinear(d_model, dim_feedforward)
        self.linear2 = TokenLinear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        # relu not in place: see token_linear.
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as in Mask2Former; for channel counts not divisible by 32 (small test
    models) the largest group count <= 32 that divides the channels."""
    groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2's c2_xavier_fill: Kaiming uniform with a=1, zero bias.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _reference_points(spatial_shapes: Sequence[tuple[int, int]], num_levels: int, device) -> Tensor:
    """[1, S, L, 2] normalised (x, y) pixel centres of every location, repeated for each level."""
    refs = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([ref_x.reshape(-1), ref_y.reshape(-1)], -1))
    ref = torch.cat(refs, 0)
    return ref[None, :, None, :].expand(1, -1, num_levels, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on res3-res5 + FPN to res2 + 1x1 conv to mask features.

    Args:
        in_channels: channels of the 4 backbone levels (strides 4, 8, 16, 32).
        conv_dim: encoder width (d_model). mask_dim: channels of the mask features.
        num_layers: deformable encoder layers (0: input projections only).
        nheads, n_points, dim_feedforward: encoder attention heads, sampling points per head per
            level, FFN width.

    forward(features: 4 maps [B, C_i, H_i, W_i], fine to coarse) ->
        (mask_features [B, mask_dim, H_0, W_0],
         multi_scale: 3 maps [B, conv_dim, H_i, W_i] ordered 1/32, 1/16, 1/8).
    Runs in float32 even under autocast, as Mask2Former does.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        nheads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected 4 input levels, got {len(in_channels)}")
        self.num_levels = 3
        self.num_layers = num_layers
        # Projections of res5, res4, res3 (coarse to fine, the encoder's level order).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, 1), _group_norm(conv_dim))
            for c in in_channels[1:][::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        if num_layers > 0:
            self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
            self.level_embed = nn.Parameter(torch.empty(self.num_levels, conv_dim))
            self.layers = nn.ModuleList(
                DeformableEncoderLayer(conv_dim, dim_feedforward, self.num_levels, nheads, n_points)
                for _ in range(num_layers)
            )
            for p in self.layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for layer in self.layers:
                layer.self_attn.reset_parameters()
            nn.init.normal_(self.level_embed)
        self.lateral_conv = nn.Sequential(
            nn.Conv2d(in_channels[0], conv_dim, 1, bias=False), _group_norm(conv_dim)
        )
        self.output_conv = nn.Sequential(
            nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False),
            _group_norm(conv_dim),
            nn.ReLU(),
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        for conv in (self.lateral_conv[0], self.output_conv[0], self.mask_features):
            _c2_xavier_fill(conv)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            return self._forward(features)

    def _forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        coarse_to_fine = [f.float() for f in features[1:][::-1]]  # res5, res4, res3
        srcs = [proj(x) for proj, x in zip(self.input_proj, coarse_to_fine, strict=True)]
        shapes = [(x.shape[-2], x.shape[-1]) for x in srcs]
        b, c = srcs[0].shape[:2]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)  # [B, S, C]
        if self.num_layers > 0:
            pos = torch.cat(
                [
                    (self.pe_layer(x).flatten(2) + self.level_embed[i].view(1, -1, 1)).transpose(
                        1, 2
                    )
                    for i, x in enumerate(srcs)
                ],
                1,
            )
            ref = _reference_points(shapes, self.num_levels, src.device)
            for layer in self.layers:
                src = layer(src, pos, ref, shapes)
        multi_scale = []
        for x, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes, strict=True):
            multi_scale.append(x.transpose(1, 2).reshape(b, c, h, w))
        lateral = self.lateral_conv(features[0].float())
        y = lateral + F.interpolate(
            multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        y = self.output_conv(y)
        return self.mask_features(y), multi_scale
