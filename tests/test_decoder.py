import pytest
import torch
from torch import nn

from gdistill.model.decoder import MaskedAttentionDecoder

DIM, MASK_DIM, K, Q = 32, 16, 5, 6


class ConstEmbed(nn.Module):
    """Mask embedding of all ones: every query's mask logits = Σ_c mask_features[c]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(*x.shape[:-1], MASK_DIM, dtype=x.dtype)


def make_decoder(dec_layers=3):
    torch.manual_seed(0)
    return MaskedAttentionDecoder(K, hidden_dim=DIM, num_queries=Q, nheads=4,
                                  dim_feedforward=64, dec_layers=dec_layers, mask_dim=MASK_DIM)


def make_inputs(batch=2, size=64):
    """Features of a size×size image: 1/32, 1/16, 1/8 levels and 1/4 mask features."""
    g = torch.Generator().manual_seed(1)
    multi = [torch.randn(batch, DIM, size // s, size // s, generator=g) for s in (32, 16, 8)]
    return multi, torch.randn(batch, MASK_DIM, size // 4, size // 4, generator=g)


def test_output_shapes():
    dec = make_decoder(dec_layers=4)
    multi, mf = make_inputs()
    out = dec(multi, mf)
    assert out["pred_logits"].shape == (2, Q, K + 1)
    assert out["pred_masks"].shape == (2, Q, 16, 16)
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, Q, K + 1)
        assert aux["pred_masks"].shape == (2, Q, 16, 16)


def test_non_square_input():
    dec = make_decoder(dec_layers=3)
    g = torch.Generator().manual_seed(0)
    multi = [torch.randn(1, DIM, 64 // s, 96 // s, generator=g) for s in (32, 16, 8)]
    out = dec(multi, torch.randn(1, MASK_DIM, 16, 24, generator=g))
    assert out["pred_masks"].shape == (1, Q, 16, 24)


def test_zero_layers_predicts_from_queries_only():
    dec = make_decoder(dec_layers=0)
    multi, mf = make_inputs()
    out = dec(multi, mf)
    assert out["aux_outputs"] == []
    # Depends on the queries only: the same prediction for both images' logits.
    torch.testing.assert_close(out["pred_logits"][0], out["pred_logits"][1])
    q = dec.decoder_norm(dec.query_feat.weight)
    torch.testing.assert_close(out["pred_logits"][0], dec.class_embed(q))


def test_mask_logits_are_embedding_dot_mask_features():
    dec = make_decoder(dec_layers=2)
    dec.mask_embed = ConstEmbed()
    multi, mf = make_inputs()
    out = dec(multi, mf)
    expected = mf.sum(1, keepdim=True).expand(-1, Q, -1, -1)
    torch.testing.assert_close(out["pred_masks"], expected)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"], expected)


def test_empty_masks_are_not_fully_masked():
    dec = make_decoder(dec_layers=3)
    dec.mask_embed = ConstEmbed()
    multi, _ = make_inputs()
    mf = -torch.ones(2, MASK_DIM, 16, 16)  # every mask logit < 0: every query's mask is empty
    out = dec(multi, mf)
    assert torch.isfinite(out["pred_logits"]).all()
    for aux in out["aux_outputs"]:
        assert torch.isfinite(aux["pred_logits"]).all()
    # Unmasked means the query sees all positions: changing any feature changes the output.
    multi2 = [m.clone() for m in multi]
    multi2[0][0, :, 1, 1] += 5.0
    assert not torch.allclose(dec(multi2, mf)["aux_outputs"][1]["pred_logits"][0],
                              out["aux_outputs"][1]["pred_logits"][0])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("image", [0, 1])
def test_queries_attend_only_inside_their_masks(image, training):
    """One layer on level 1/32 (2x2 here). Image 0's masks cover the left half, image 1's the
    right half: features outside an image's masks must not change its output. In eval mode the
    attention masks come from mask features resized to the level, not from resized masks."""
    dec = make_decoder(dec_layers=1).train(training)
    dec.mask_embed = ConstEmbed()
    multi, _ = make_inputs()
    mf = -torch.ones(2, MASK_DIM, 16, 16)
    mf[0, :, :, :8] = 1.0
    mf[1, :, :, 8:] = 1.0
    out = dec(multi, mf)["pred_logits"]
    inside, outside = (0, 1) if image == 0 else (1, 0)

    changed = [m.clone() for m in multi]
    changed[0][image, :, :, outside] += 5.0
    out2 = dec(changed, mf)["pred_logits"]
    torch.testing.assert_close(out2, out)

    changed = [m.clone() for m in multi]
    changed[0][image, :, :, inside] += 5.0
    out3 = dec(changed, mf)["pred_logits"]
    assert not torch.allclose(out3[image], out[image])
    torch.testing.assert_close(out3[1 - image], out[1 - image])  # images stay independent


def test_eval_mode_gives_the_training_outputs_without_deep_supervision():
    dec = make_decoder(dec_layers=4)
    multi, mf = make_inputs(size=128)  # levels 4x4, 8x8, 16x16; masks 32x32
    trained = dec(multi, mf)
    with torch.no_grad():
        evaluated = dec.eval()(multi, mf)
    assert evaluated["aux_outputs"] == []
    torch.testing.assert_close(evaluated["pred_logits"], trained["pred_logits"])
    torch.testing.assert_close(evaluated["pred_masks"], trained["pred_masks"])


def test_layers_cycle_through_levels():
    """Layer i reads level i % 3: with 2 layers the finest level (1/8) is never read."""
    dec = make_decoder(dec_layers=2)
    multi, mf = make_inputs()
    out = dec(multi, mf)["pred_logits"]
    for lvl, expect_change in [(0, True), (1, True), (2, False)]:
        changed = [m.clone() for m in multi]
        changed[lvl] += torch.randn_like(changed[lvl])
        same = torch.allclose(dec(changed, mf)["pred_logits"], out)
        assert same != expect_change


def test_gradients_reach_every_parameter():
    dec = make_decoder(dec_layers=3)
    multi, mf = make_inputs()
    multi = [m.requires_grad_() for m in multi]
    mf.requires_grad_()
    out = dec(multi, mf)
    total = out["pred_logits"].square().sum() + out["pred_masks"].square().mean()
    for aux in out["aux_outputs"]:
        total = total + aux["pred_logits"].square().sum() + aux["pred_masks"].square().mean()
    total.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(m.grad.abs().sum() > 0 for m in multi)
    assert mf.grad.abs().sum() > 0


def test_wrong_number_of_levels():
    dec = make_decoder()
    multi, mf = make_inputs()
    with pytest.raises(ValueError, match="3 feature levels"):
        dec(multi[:2], mf)
