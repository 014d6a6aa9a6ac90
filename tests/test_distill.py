import math

import pytest
import torch

from gdistill.distill.ema import ema_update
from gdistill.distill.pseudo_labels import (
    PseudoLabelQuality,
    matched_ground_truth,
    pseudo_labels_from_teacher,
)
from gdistill.distill.schedule import teacher_decay_for_step, unsupervised_loss_active


def _logits_for(probs):
    """Logits whose softmax equals `probs` (rows sum to 1)."""
    return torch.tensor(probs).log()


def test_pseudo_label_filter_on_hand_made_outputs():
    # K = 2 classes + no-object; 4 queries on one image, 4x4 masks.
    logits = _logits_for(
        [
            [0.90, 0.05, 0.05],  # class 0, confident, big mask -> kept
            [0.10, 0.80, 0.10],  # class 1, confident, but mask too small -> dropped
            [0.05, 0.05, 0.90],  # no-object -> dropped
            [0.30, 0.65, 0.05],  # class 1 but 0.65 <= 0.7 -> dropped
        ]
    )[None]
    masks = torch.full((1, 4, 4, 4), -10.0)
    masks[0, 0, :3, :3] = 10.0  # soft area ~9 > 5
    masks[0, 1, :2, :2] = 10.0  # soft area ~4 <= 5
    masks[0, 3] = 10.0
    targets, stats = pseudo_labels_from_teacher(logits, masks, 0.7, 5.0, 0.5)
    assert targets[0]["labels"].tolist() == [0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(targets[0]["masks"][0], expected)
    assert targets[0]["masks"].dtype == torch.bool
    assert stats["pl_kept"] == 1 and stats["pl_candidates"] == 3
    assert stats["pl_mean_score"] == pytest.approx(0.9, abs=1e-5)
    assert stats["pl_images_without"] == 0


def test_pseudo_label_valid_region_and_empty_image():
    logits = _logits_for([[0.9, 0.05, 0.05]])[None].repeat(2, 1, 1)
    masks = torch.full((2, 1, 4, 4), 10.0)
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[0, :, :8] = True  # left half real: soft area 8 -> kept, right half cleared
    targets, stats = pseudo_labels_from_teacher(logits, masks, 0.7, 5.0, 0.5, valid)
    assert targets[0]["masks"][0, :, :2].all() and not targets[0]["masks"][0, :, 2:].any()
    assert len(targets[1]["labels"]) == 0  # nothing valid in image 1
    assert stats["pl_images_without"] == 1


def test_ema_arithmetic_on_parameters_and_buffers():
    teacher = torch.nn.BatchNorm1d(2)
    student = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        teacher.running_mean.fill_(0.0)
        student.running_mean.fill_(10.0)
    teacher.num_batches_tracked.fill_(1)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((2,), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(teacher.running_mean, torch.full((2,), 1.0))
    assert int(teacher.num_batches_tracked) == 7  # integer buffers are copied
    ema_update(teacher, student, 0.0)  # hand-over: exact copy
    assert torch.equal(teacher.weight, student.weight)
    assert torch.equal(teacher.running_mean, student.running_mean)


def test_ema_equals_per_tensor_lerp_on_a_model_with_mixed_buffers():
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 3))

    teacher, student = make(), make()
    student(torch.randn(2, 3, 4, 4))  # moves BN running stats and num_batches_tracked
    expected = {}
    student_state = student.state_dict()
    for name, t in teacher.state_dict().items():
        s = student_state[name]
        expected[name] = t.lerp(s, 1 - 0.99) if t.is_floating_point() else s.clone()
    ema_update(teacher, student, 0.99)
    for name, t in teacher.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert int(teacher[1].num_batches_tracked) == 1


def test_ema_is_not_recorded_by_autograd():
    teacher = torch.nn.Linear(3, 3)
    student = torch.nn.Linear(3, 3)
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss = student(torch.randn(2, 3)).sum()
    ema_update(teacher, student, 0.5)
    assert all(p.grad_fn is None for p in teacher.parameters())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "mode,expected",
    [
        # decay applied before steps 0..5 with burnin_iters=3, ema 0.99
        ("guided", [None, None, None, 0.0, 0.99, 0.99]),
        ("standard", [None, None, None, 0.0, 0.99, 0.99]),
        ("none", [0.0, 0.99, 0.99, 0.99, 0.99, 0.99]),
    ],
)
def test_handover_at_exact_iteration(mode, expected):
    assert [teacher_decay_for_step(s, mode, 3, 0.99) for s in range(6)] == expected


def test_unsupervised_loss_by_burn_in_mode():
    assert [unsupervised_loss_active(s, "guided", 3) for s in range(5)] == [True] * 5
    assert [unsupervised_loss_active(s, "standard", 3) for s in range(5)] == [False] * 3 + [True] * 2
    assert [unsupervised_loss_active(s, "none", 3) for s in range(5)] == [True] * 5


def test_precision_recall_on_hand_made_case():
    gt = torch.zeros(2, 10, 10, dtype=torch.bool)
    gt[0, :5, :5] = True
    gt[1, 5:, 5:] = True
    gt_labels = torch.tensor([0, 1])
    pred = torch.zeros(4, 10, 10, dtype=torch.bool)
    pred[0, :5, :5] = True  # exact match of gt 0, right class -> TP
    pred[1, :5, :5] = True  # duplicate of gt 0 -> FP (already matched)
    pred[2, 5:, 5:] = True  # right place, wrong class -> FP
    pred[3, 5:, 6:] = True  # IoU 0.8 with gt 1, right class -> TP (score 0.6)
    labels = torch.tensor([0, 0, 0, 1])
    scores = torch.tensor([0.95, 0.9, 0.8, 0.6])
    assert matched_ground_truth(labels, pred, scores, gt_labels, gt).tolist() == [True, True]
    quality = PseudoLabelQuality([0.5, 0.85])
    quality.update(labels, pred, scores, gt_labels, gt)
    s = quality.summary()
    assert s["pl_precision@0.5"] == pytest.approx(2 / 4) and s["pl_recall@0.5"] == pytest.approx(1.0)
    # at 0.85 only the two first remain: one TP (exact), one duplicate
    assert s["pl_precision@0.85"] == pytest.approx(1 / 2) and s["pl_recall@0.85"] == pytest.approx(0.5)
    assert not math.isnan(s["pl_precision@0.5"])


def test_recall_by_object_size_uses_coco_area_ranges():
    gt = torch.zeros(3, 100, 100, dtype=torch.bool)
    gt[0, :10, :10] = True  # 100 px: small (< 32²)
    gt[1, :40, 50:90] = True  # 1600 px: medium
    gt[2] = True  # 10 000 px: large (>= 96²)
    gt_labels = torch.tensor([0, 1, 2])
    pred = gt.clone()
    labels = torch.tensor([0, 2, 2])  # the medium object gets the wrong class
    scores = torch.tensor([0.9, 0.9, 0.6])
    quality = PseudoLabelQuality([0.5, 0.7])
    quality.update(labels, pred, scores, gt_labels, gt)
    s = quality.summary()
    assert (s["pl_recall_small@0.5"], s["pl_recall_medium@0.5"], s["pl_recall_large@0.5"]) == (1, 0, 1)
    assert (s["pl_recall_small@0.7"], s["pl_recall_medium@0.7"], s["pl_recall_large@0.7"]) == (1, 0, 0)
    assert s["pl_recall@0.5"] == pytest.approx(2 / 3)
    # another shard with one more small object, missed: merged counts
    other = PseudoLabelQuality([0.5, 0.7])
    other.update(labels[:0], pred[:0], scores[:0], gt_labels[:1], gt[:1])
    assert other.summary()["pl_recall_large@0.5"] is None  # no large object in its ground truth
    quality.merge(other)
    assert quality.summary()["pl_recall_small@0.5"] == pytest.approx(1 / 2)
