import math

import pytest
import torch

import gdistill.model.criterion as criterion_module
from gdistill.model.criterion import SetCriterion
from gdistill.model.matcher import HungarianMatcher
from gdistill.model.point_sampling import point_sample, point_sample_shared, sample_uncertain_points


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def manual_bilinear(img, x, y):
    """Bilinear read at normalised (x, y), align_corners=False, zeros outside."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[yy, xx].item()
    return total


def pixel_centres(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1)


@pytest.fixture
def pixel_centre_points(monkeypatch):
    """Make criterion and matcher sample exactly the pixel centres of the prediction map."""

    def fake_sample(logits, num_points, oversample_ratio, importance_sample_ratio):
        return pixel_centres(*logits.shape[-2:]).expand(logits.shape[0], -1, -1)

    def fake_forward(self, outputs, targets):
        coords = pixel_centres(*outputs["pred_masks"].shape[-2:])
        return self.match(outputs, targets, [coords] * len(targets))

    monkeypatch.setattr(criterion_module, "sample_uncertain_points", fake_sample)
    monkeypatch.setattr(HungarianMatcher, "forward", fake_forward)


# ---- point sampling ----------------------------------------------------------------------------


def test_point_sample_matches_manual_bilinear():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 5, 7)
    coords = torch.tensor([[[0.5, 0.5], [0.13, 0.77], [0.0, 0.0], [0.99, 0.31]]] * 2)
    coords[1] = torch.rand(4, 2)
    out = point_sample(img, coords)
    assert out.shape == (2, 3, 4)
    for n in range(2):
        for c in range(3):
            for p in range(4):
                x, y = coords[n, p].tolist()
                assert out[n, c, p].item() == pytest.approx(manual_bilinear(img[n, c], x, y),
                                                            abs=1e-5)
    out3 = point_sample(img[:, 0], coords)
    assert out3.shape == (2, 4)
    torch.testing.assert_close(out3, out[:, 0])


def test_point_sample_shared_reads_every_map_at_the_same_points():
    torch.manual_seed(0)
    maps = torch.randn(3, 5, 7)
    coords = torch.rand(6, 2)
    out = point_sample_shared(maps, coords)
    assert out.shape == (3, 6)
    for n in range(3):
        for p in range(6):
            x, y = coords[p].tolist()
            assert out[n, p].item() == pytest.approx(manual_bilinear(maps[n], x, y), abs=1e-5)
    # Bitwise the channels layout it replaces in the matcher.
    assert torch.equal(out, point_sample(maps[None], coords[None])[0])


def test_sample_uncertain_points_keeps_most_uncertain():
    torch.manual_seed(0)
    logits = 4 * torch.randn(3, 1, 6, 6)
    torch.manual_seed(1)
    coords = sample_uncertain_points(logits, 20, oversample_ratio=3.0, importance_sample_ratio=1.0)
    assert coords.shape == (3, 20, 2)
    # Replay the candidates: the kept points are the 20 of 60 with the smallest |logit|.
    torch.manual_seed(1)
    candidates = torch.rand(3, 60, 2)
    values = point_sample(logits, candidates)[:, 0].abs()
    for n in range(3):
        kept = point_sample(logits[n:n + 1], coords[n:n + 1])[0, 0].abs().sort().values
        torch.testing.assert_close(kept, values[n].sort().values[:20])


def test_sample_uncertain_points_mixes_random_points_and_is_seeded():
    logits = torch.randn(2, 1, 4, 4)
    torch.manual_seed(3)
    a = sample_uncertain_points(logits, 16, 3.0, 0.75)
    torch.manual_seed(3)
    b = sample_uncertain_points(logits, 16, 3.0, 0.75)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 16, 2) and a.min() >= 0 and a.max() <= 1
    # The last 4 points are fresh uniform draws, not among the candidates.
    torch.manual_seed(3)
    candidates = torch.rand(2, 48, 2)
    extra = torch.rand(2, 4, 2)
    torch.testing.assert_close(a[:, 12:], extra)
    assert (a[:, :12, None, :] == candidates[:, None]).all(-1).any(-1).all()


# ---- criterion ---------------------------------------------------------------------------------


def hand_losses(logits, mask_logits, label, tgt_mask, matched):
    """CE (weights 1, no-object 0.1), BCE and dice of one matched pair, in plain Python."""
    ce_num, ce_den = 0.0, 0.0
    for q, row in enumerate(logits):
        target = label if q == matched else len(row) - 1
        w = 1.0 if q == matched else 0.1
        log_z = math.log(sum(math.exp(v) for v in row))
        ce_num += w * (log_z - row[target])
        ce_den += w
    xs = [v for r in mask_logits for v in r]
    ts = [float(v) for r in tgt_mask for v in r]
    bce = sum(softplus(-x) if t else softplus(x) for x, t in zip(xs, ts, strict=True)) / len(xs)
    ps = [sigmoid(x) for x in xs]
    dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts, strict=True)) + 1) / (sum(ps) + sum(ts) + 1)
    return 2.0 * ce_num / ce_den, 5.0 * bce, 5.0 * dice


def make_criterion(k=2):
    return SetCriterion(k, HungarianMatcher(num_points=64), num_points=16)


def test_losses_match_hand_computation_with_aux(pixel_centre_points):
    final_logits = [[0.5, 2.0, -1.0], [0.2, 0.1, 1.5]]  # query 0 is clearly class 1
    final_masks = [[[2.0, -1.0], [0.5, 3.0]], [[-3.0, -3.0], [-3.0, -3.0]]]
    aux_logits = [[0.0, 0.0, 3.0], [-1.0, 1.0, 0.3]]  # here query 1 is the match
    aux_masks = [[[-3.0, -3.0], [-3.0, -3.0]], [[1.0, -2.0], [0.25, 0.0]]]
    tgt = [[True, False], [True, True]]
    outputs = {
        "pred_logits": torch.tensor([final_logits], requires_grad=True),
        "pred_masks": torch.tensor([final_masks], requires_grad=True),
        "aux_outputs": [{"pred_logits": torch.tensor([aux_logits]),
                         "pred_masks": torch.tensor([aux_masks])}],
    }
    targets = [{"labels": torch.tensor([1]), "masks": torch.tensor([tgt])}]
    losses = make_criterion()(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice",
                           "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    ce, bce, dice = hand_losses(final_logits, final_masks[0], 1, tgt, matched=0)
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-5)
    ce, bce, dice = hand_losses(aux_logits, aux_masks[1], 1, tgt, matched=1)
    assert losses["loss_ce_0"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_mask_0"].item() == pytest.approx(bce, rel=1e-5)
    assert losses["loss_dice_0"].item() == pytest.approx(dice, rel=1e-5)

    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad[0, 0].abs().sum() > 0
    assert outputs["pred_masks"].grad[0, 1].abs().sum() == 0  # unmatched: no mask loss


def test_mask_losses_are_divided_by_batch_target_count(pixel_centre_points):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3)
    masks = torch.randn(2, 3, 4, 4)
    tgt = [{"labels": torch.tensor([0]), "masks": torch.rand(1, 4, 4) > 0.5},
           {"labels": torch.tensor([1, 0]), "masks": torch.rand(2, 4, 4) > 0.5}]
    crit = make_criterion()
    both = crit({"pred_logits": logits, "pred_masks": masks}, tgt)
    # Per image alone num_masks is 1 and 2; together 3: the batch loss is the count-weighted mean.
    one = crit({"pred_logits": logits[:1], "pred_masks": masks[:1]}, tgt[:1])
    two = crit({"pred_logits": logits[1:], "pred_masks": masks[1:]}, tgt[1:])
    for key in ("loss_mask", "loss_dice"):
        expected = (1 * one[key] + 2 * two[key]) / 3
        assert both[key].item() == pytest.approx(expected.item(), rel=1e-5)


def test_targets_of_other_resolutions(pixel_centre_points):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3)
    masks = torch.randn(2, 3, 4, 4)
    small = [torch.rand(1, 4, 4) > 0.5, torch.rand(2, 4, 4) > 0.5]
    labels = [torch.tensor([0]), torch.tensor([1, 0])]
    crit = make_criterion()
    outputs = {"pred_logits": logits, "pred_masks": masks}
    pairs = zip(labels, small, strict=True)
    base = crit(outputs, [{"labels": lab, "masks": m} for lab, m in pairs])
    # Image 0 at 2x, image 1 at 4x (nearest upsampling): pixel centres read the same values.
    up = [small[0].repeat_interleave(2, 1).repeat_interleave(2, 2),
          small[1].repeat_interleave(4, 1).repeat_interleave(4, 2)]
    mixed = crit(outputs, [{"labels": lab, "masks": m} for lab, m in zip(labels, up, strict=True)])
    for key in base:
        assert mixed[key].item() == pytest.approx(base[key].item(), rel=1e-5)


def test_no_targets_trains_everything_to_no_object():
    logits = torch.randn(2, 3, 3, requires_grad=True)
    masks = torch.randn(2, 3, 4, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    outputs = {"pred_logits": logits, "pred_masks": masks,
               "aux_outputs": [{"pred_logits": logits * 2, "pred_masks": masks * 2}]}
    losses = make_criterion()(outputs, [empty, empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_mask_0"].item() == 0 and losses["loss_dice_0"].item() == 0
    # All weights are 0.1, so the weighted mean is the plain mean of -log p(no-object).
    expected = -torch.log_softmax(logits.detach(), -1)[..., 2].mean() * 2.0
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert masks.grad is not None and masks.grad.abs().sum() == 0
    assert logits.grad.abs().sum() > 0


def test_real_point_sampling_gives_finite_losses_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, requires_grad=True)
    masks = torch.randn(2, 5, 8, 8, requires_grad=True)
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 32, 32) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, 32, 32) > 0.5}]
    crit = SetCriterion(3, HungarianMatcher(num_points=100), num_points=50)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert logits.grad.abs().sum() > 0 and masks.grad.abs().sum() > 0
    assert torch.equal(crit.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.1]))
