"""Mask2Former: backbone → pixel decoder → masked-attention decoder; outputs → instances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.errors import NonFiniteOutputsError
from gdistill.model.backbone import build_backbone
from gdistill.model.decoder import MaskedAttentionDecoder
from gdistill.model.pixel_decoder import MSDeformAttnPixelDecoder


@dataclass
class Instances:
    """Predicted instances of one image, at its original size.

    scores [N], labels [N] (contiguous class ids), masks bool [N, H, W].
    """

    scores: Tensor
    labels: Tensor
    masks: Tensor


def sorted_by_score(instances: Instances, min_score: float = float("-inf")) -> Instances:
    """The instances scoring at least ``min_score``, in descending score order."""
    keep = (instances.scores >= min_score).nonzero().flatten()
    order = keep[instances.scores[keep].argsort(descending=True)]
    return Instances(instances.scores[order], instances.labels[order], instances.masks[order])


class Mask2Former(nn.Module):
    """Images in [0, 1] → ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H/4, W/4],
    "aux_outputs": [...]}``. Normalisation with ImageNet statistics happens inside."""

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        decoder: nn.Module,
        num_classes: int,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    def forward(self, images: Tensor) -> dict:
        """images: float [B, 3, H, W] in [0, 1], H and W multiples of 32."""
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features)


def build_model(cfg_model, num_classes: int | None = None) -> Mask2Former:
    """Build Mask2Former from a :class:`gdistill.config.ModelConfig`."""
    k = num_classes if num_classes is not None else cfg_model.num_classes
    if k <= 0:
        raise ValueError("num_classes must be positive")
    backbone = build_backbone(
        cfg_model.backbone,
        pretrained=cfg_model.pretrained,
        weights_path=cfg_model.backbone_weights,
        frozen_stages=cfg_model.frozen_stages,
        frozen_bn=cfg_model.frozen_bn,
        drop_path_rate=cfg_model.drop_path_rate,
    )
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=list(backbone.channels),
        conv_dim=cfg_model.hidden_dim,
        mask_dim=cfg_model.mask_dim,
        num_layers=cfg_model.enc_layers,
        nheads=cfg_model.nheads,
        n_points=cfg_model.enc_points,
        dim_feedforward=cfg_model.enc_dim_feedforward,
    )
    decoder = MaskedAttentionDecoder(
        num_classes=k,
        hidden_dim=cfg_model.hidden_dim,
        num_queries=cfg_model.num_queries,
        nheads=cfg_model.nheads,
        dim_feedforward=cfg_model.dim_feedforward,
        dec_layers=cfg_model.dec_layers,
        mask_dim=cfg_model.mask_dim,
    )
    return Mask2Former(backbone, pixel_decoder, decoder, k, cfg_model.pixel_mean, cfg_model.pixel_std)


def images_to_model_input(images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] → float [B, 3, H, W] in [0, 1]."""
    return images.float().div_(255.0)


def check_finite_outputs(pred_logits: Tensor, pred_masks: Tensor, whose: str) -> None:
    """Raise NonFiniteOutputsError when the class or mask logits hold NaN or inf: NaN scores
    would otherwise become no detections (AP 0, no pseudo-label) without a word."""
    if not (torch.isfinite(pred_logits).all() and torch.isfinite(pred_masks).all()):
        raise NonFiniteOutputsError(
            f"{whose}'s outputs are not finite (NaN or inf): its weights have diverged; train "
            "it again with a lower solver.lr"
        )


@torch.no_grad()
def instances_from_outputs(
    pred_logits: Tensor,
    pred_masks: Tensor,
    image_sizes: list[tuple[int, int]],
    orig_sizes: list[tuple[int, int]],
    top_k: int = 100,
    min_score: float = 0.0,
) -> list[Instances]:
    """Mask2Former instance inference.

    pred_logits [B, Q, K+1], pred_masks [B, Q, h, w] (stride 4 of the padded batch).
    image_sizes: the (h, w) of each image inside the padded batch; orig_sizes: the size to return
    masks at. The top-k (query, class) pairs by class probability are kept (a query may appear
    with several classes); score = class probability × mean mask probability inside its mask.
    Pairs whose class probability is below ``min_score`` are left out before their masks are
    made (their score, at most that probability, would be too): a score threshold then costs no
    full-size masks of the queries it drops.
    """
    check_finite_outputs(pred_logits, pred_masks, "the model")
    batch, num_queries, k1 = pred_logits.shape
    num_classes = k1 - 1
    padded_h, padded_w = pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4
    results = []
    for i in range(batch):
        probs = pred_logits[i].float().softmax(-1)[:, :num_classes]  # [Q, K]
        k = min(top_k, probs.numel())
        scores, flat = probs.flatten().topk(k)
        if min_score > 0:
            scores, flat = scores[scores >= min_score], flat[scores >= min_score]
        query = flat // num_classes
        labels = flat % num_classes
        # Upsample each kept query once (a query may be kept with several classes): to the
        # padded input, crop, then to the original size; in chunks, so that a 12-megapixel
        # photo holds a few float masks at a time besides the boolean ones it returns, written
        # straight to the place of each (query, class) pair.
        kept, row = query.unique(return_inverse=True)
        h, w = image_sizes[i]
        out_h, out_w = orig_sizes[i]
        masks = torch.empty((len(query), out_h, out_w), dtype=torch.bool, device=pred_masks.device)
        mask_score = torch.empty(len(kept), device=pred_masks.device)
        chunk = max(1, UPSAMPLE_ELEMENTS // max(1, out_h * out_w, padded_h * padded_w))
        for start in range(0, len(kept), chunk):
            logits = pred_masks[i, kept[start : start + chunk]].float()[None]
            logits = F.interpolate(logits, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
            logits = logits[:, :, :h, :w]
            logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
            binary = logits > 0
            inside = (logits.sigmoid_() * binary).flatten(1).sum(1)
            mask_score[start : start + chunk] = inside / binary.flatten(1).sum(1).clamp(min=1)
            pairs = ((row >= start) & (row < start + len(binary))).nonzero().flatten()
            masks[pairs] = binary[row[pairs] - start]
        results.append(Instances(scores=scores * mask_score[row], labels=labels, masks=masks))
    return results


UPSAMPLE_ELEMENTS = 1 << 25  # float mask pixels upsampled at once (128 MiB)
