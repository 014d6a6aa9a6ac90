import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gdistill.model.matcher import (
    HungarianMatcher,
    match_costs,
    pairwise_dice,
    pairwise_sigmoid_bce,
)


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """[h*w, 2] (x, y) coords of all pixel centres: sampling there reads the pixels exactly."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1)


def pair_cost(logits, mask_logits, label, tgt_mask, wc=2.0, wm=5.0, wd=5.0):
    """Cost of one (prediction, target) pair from pixels, written without the matcher."""
    prob = logits.softmax(-1)[label]
    x, t = mask_logits.flatten(), tgt_mask.flatten().float()
    bce = F.binary_cross_entropy_with_logits(x, t)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return (-wc * prob + wm * bce + wd * dice).item()


def random_case(q=4, m=3, k=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, q, k + 1, generator=g),
        "pred_masks": 3 * torch.randn(1, q, size, size, generator=g),
    }
    targets = [{
        "labels": torch.randint(0, k, (m,), generator=g),
        "masks": torch.rand(m, size, size, generator=g) > 0.5,
    }]
    return outputs, targets


def test_pairwise_costs_match_elementwise_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 50)
    t = torch.rand(2, 50)  # soft targets (bilinear samples of binary masks)
    bce = pairwise_sigmoid_bce(x, t)
    dice = pairwise_dice(x, t)
    for i in range(3):
        for j in range(2):
            expected = F.binary_cross_entropy_with_logits(x[i], t[j])
            assert bce[i, j].item() == pytest.approx(expected.item(), rel=1e-5)
            p = x[i].sigmoid()
            d = 1 - (2 * (p * t[j]).sum() + 1) / (p.sum() + t[j].sum() + 1)
            assert dice[i, j].item() == pytest.approx(d.item(), rel=1e-5)


def test_match_costs_equal_per_pair_costs_at_pixel_centres():
    outputs, targets = random_case()
    cost = match_costs(
        outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"],
        targets[0]["masks"], pixel_centres(8, 8),
    )
    assert cost.shape == (4, 3) and cost.dtype == torch.float32
    for i in range(4):
        for j in range(3):
            expected = pair_cost(
                outputs["pred_logits"][0, i], outputs["pred_masks"][0, i],
                targets[0]["labels"][j], targets[0]["masks"][j],
            )
            assert cost[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("q,m", [(4, 3), (2, 3), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_is_optimal_against_brute_force(q, m, seed):
    outputs, targets = random_case(q=q, m=m, seed=seed)
    matcher = HungarianMatcher()
    (rows, cols), = matcher.match(outputs, targets, [pixel_centres(8, 8)])
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert len(rows) == min(q, m)
    pair = [[pair_cost(outputs["pred_logits"][0, i], outputs["pred_masks"][0, i],
                       targets[0]["labels"][j], targets[0]["masks"][j])
             for j in range(m)] for i in range(q)]
    # Every injective assignment of the smaller side into the larger one.
    best, best_pairs = math.inf, None
    if q >= m:
        for preds in itertools.permutations(range(q), m):
            total = sum(pair[preds[j]][j] for j in range(m))
            if total < best:
                best, best_pairs = total, sorted((preds[j], j) for j in range(m))
    else:
        for tgts in itertools.permutations(range(m), q):
            total = sum(pair[i][tgts[i]] for i in range(q))
            if total < best:
                best, best_pairs = total, sorted((i, tgts[i]) for i in range(q))
    got = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == best_pairs
    assert sum(pair[i][j] for i, j in got) == pytest.approx(best, rel=1e-6)


def test_forward_with_random_points_finds_obvious_assignment():
    torch.manual_seed(0)
    size = 16
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    masks[0, :8, :8] = True
    masks[1, 8:, :] = True
    masks[2, :8, 8:] = True
    # Query 3 predicts target 0, query 0 target 1, query 1 target 2, query 2 nothing.
    pred_masks = torch.full((1, 4, size, size), -8.0)
    for q, t in [(3, 0), (0, 1), (1, 2)]:
        pred_masks[0, q][masks[t]] = 8.0
    labels = torch.tensor([2, 0, 1])
    logits = torch.zeros(1, 4, 4)
    logits[0, 3, 2] = logits[0, 0, 0] = logits[0, 1, 1] = 5.0
    matcher = HungarianMatcher(num_points=256)
    (rows, cols), = matcher({"pred_logits": logits, "pred_masks": pred_masks},
                            [{"labels": labels, "masks": masks}])
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 2), (3, 0)]


def test_empty_targets_give_empty_indices():
    outputs, targets = random_case()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    indices = HungarianMatcher(num_points=64)(outputs, [empty, targets[0]])
    assert len(indices) == 2
    assert indices[0][0].shape == (0,) and indices[0][0].dtype == torch.int64
    assert indices[0][1].shape == (0,) and indices[0][1].dtype == torch.int64
    assert len(indices[1][0]) == 3
    indices = HungarianMatcher(num_points=64)(
        {k: v[:1] for k, v in outputs.items()}, [empty]
    )
    assert [len(i) for i in indices[0]] == [0, 0]


def test_targets_at_higher_resolution_give_same_costs():
    outputs, targets = random_case()
    big = targets[0]["masks"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    args = (outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"])
    small_cost = match_costs(*args, targets[0]["masks"], pixel_centres(8, 8))
    big_cost = match_costs(*args, big, pixel_centres(8, 8))
    torch.testing.assert_close(small_cost, big_cost)


def test_costs_are_fp32_under_autocast():
    outputs, targets = random_case()
    matcher = HungarianMatcher()
    low = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = match_costs(low["pred_logits"][0], low["pred_masks"][0], targets[0]["labels"],
                           targets[0]["masks"], pixel_centres(8, 8))
        indices = matcher.match(low, targets, [pixel_centres(8, 8)])
    assert cost.dtype == torch.float32
    assert len(indices[0][0]) == 3
