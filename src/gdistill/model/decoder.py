"""Masked-attention transformer decoder (Mask2Former's multi-scale decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.model.position_encoding import PositionEmbeddingSine
from gdistill.model.token_linear import TokenLinear, onednn_route, token_linear

NUM_LEVELS = 3


class MLP(nn.Module):
    """``num_layers`` (Token)Linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(TokenLinear(a, b) for a, b in pairs)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)  # not in place: see token_linear
        return x


class TokenAttention(nn.MultiheadAttention):
    """Batch-first ``nn.MultiheadAttention`` (same parameters and state dict) that returns only
    the output. Where ``token_linear`` takes its oneDNN route for the key projection
    (model/token_linear.py), all four projections go through ``token_linear`` and the attention
    is one ``scaled_dot_product_attention``; elsewhere this is ``nn.MultiheadAttention`` itself."""

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        """query [B, Q, C]; key, value [B, S, C]; attn_mask bool [B*nheads, Q, S], True = may
        not attend (no row all True). Returns [B, Q, C]."""
        if not onednn_route(key, self.in_proj_weight[: self.embed_dim]):
            return super().forward(query, key, value, attn_mask=attn_mask, need_weights=False)[0]
        (b, q, c), s, h = query.shape, key.shape[1], self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        queries = token_linear(query, w_q, b_q).view(b, q, h, c // h).transpose(1, 2)
        keys = token_linear(key, w_k, b_k).view(b, s, h, c // h).transpose(1, 2)
        values = token_linear(value, w_v, b_v).view(b, s, h, c // h).transpose(1, 2)
        allowed = None if attn_mask is None else ~attn_mask.view(b, h, q, s)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        out = out.transpose(1, 2).reshape(b, q, c)
        return token_linear(out, self.out_proj.weight, self.out_proj.bias)


class DecoderLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN, each with residual + post-LayerNorm.

    Tensors are batch-first: queries [B, Q, C], memory [B, HW, C].
    """

    def __init__(self, dim: int, nheads: int, dim_feedforward: int) -> None:
        super().__init__()
        self.cross_attn = TokenAttention(dim, nheads, dropout=0.0, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = TokenAttention(dim, nheads, dropout=0.0, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.linear1 = TokenLinear(dim, dim_feedforward)
        self.linear2 = TokenLinear(dim_feedforward, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None
    ) -> Tensor:
        """tgt, query_pos [B, Q, C]; key (memory + pos), value (memory) [B, HW, C];
        attn_mask bool [B*nheads, Q, HW], True = may not attend."""
        tgt = self.norm_cross(tgt + self.cross_attn(tgt + query_pos, key, value, attn_mask))
        q = tgt + query_pos
        tgt = self.norm_self(tgt + self.self_attn(q, q, tgt))
        return self.norm_ffn(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MaskedAttentionDecoder(nn.Module):
    """Learnable queries refined by masked attention over 3 feature levels, round-robin.

    Predictions (class logits and mask logits) are made from the learnable queries before the
    first layer and after every layer: ``dec_layers + 1`` sets. The last is the output, the
    others are ``aux_outputs`` in order (training mode only). Layer i attends to level ``i % 3``
    only where prediction i's mask (bilinearly resized to that level) has sigmoid >= 0.5; a query
    whose mask is empty at that level attends everywhere.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.nheads = nheads
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        in_channels = hidden_dim if in_channels is None else in_channels
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1)
            for _ in range(NUM_LEVELS)
        )
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, nheads, dim_feedforward) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor) -> dict:
        """multi_scale: 3 maps [B, C, h_l, w_l] ordered 1/32, 1/16, 1/8; mask_features
        [B, mask_dim, H/4, W/4]. Returns ``{"pred_logits": [B, Q, K+1], "pred_masks":
        [B, Q, H/4, W/4], "aux_outputs": [{"pred_logits", "pred_masks"}] * dec_layers}``;
        ``aux_outputs`` (deep supervision) is empty in eval mode."""
        if len(multi_scale) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} feature levels, got {len(multi_scale)}")
        batch = mask_features.shape[0]
        keys, values, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            sizes.append(tuple(x.shape[-2:]))
            # No padding mask: the encoding depends only on the shape, so compute it once.
            pos = self.pe_layer(x[:1]).flatten(2).transpose(1, 2)  # [1, HW, C]
            src = self.input_proj[lvl](x).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]
            values.append(src)
            keys.append(src + pos)  # the key of a level is the same for every layer

        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        # Deep supervision (training) needs every layer's full-resolution masks. Without it, a
        # layer's attention mask is computed at its level's size directly: bilinear resizing is
        # linear, so resizing the mask features instead of the mask logits gives the same logits.
        resized_features = {}
        if not self.training:
            with torch.no_grad():
                resized_features = {
                    size: F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                    for size in set(sizes)
                }
        aux = []
        for i, layer in enumerate(self.layers):
            size = sizes[i % NUM_LEVELS]
            if self.training:
                logits, masks, attn_mask = self._predict(tgt, mask_features, size)
                aux.append({"pred_logits": logits, "pred_masks": masks})
            else:
                with torch.no_grad():  # only the attention mask comes from it
                    embed = self.mask_embed(self.decoder_norm(tgt))
                    logits = torch.einsum("bqc,bchw->bqhw", embed, resized_features[size])
                attn_mask = self._attention_mask(logits)
            tgt = layer(tgt, query_pos, keys[i % NUM_LEVELS], values[i % NUM_LEVELS], attn_mask)
        logits, masks, _ = self._predict(tgt, mask_features, None)
        return {"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux}

    def _predict(
        self, tgt: Tensor, mask_features: Tensor, attn_size: tuple[int, int] | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Heads on queries [B, Q, C] → class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4]
        and, when ``attn_size`` is given, the next layer's attention mask
        bool [B*nheads, Q, h*w] (True = blocked)."""
        out = self.decoder_norm(tgt)
        logits = self.class_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        if attn_size is None:
            return logits, masks, None
        with torch.no_grad():
            resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        return logits, masks, self._attention_mask(resized)

    @torch.no_grad()
    def _attention_mask(self, mask_logits: Tensor) -> Tensor:
        """Mask logits [B, Q, h, w] at a level's size → bool [B*nheads, Q, h*w], True = blocked."""
        blocked = (mask_logits < 0).flatten(2)  # sigmoid < 0.5  <=>  logit < 0
        blocked &= ~blocked.all(-1, keepdim=True)  # empty masks: attend everywhere
        return blocked.repeat_interleave(self.nheads, dim=0)
