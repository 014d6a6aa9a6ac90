import math

import pytest
import torch
import torch.nn.functional as F

from gdistill.model.pixel_decoder import MSDeformAttn, MSDeformAttnPixelDecoder, ms_deform_attn
from gdistill.model.position_encoding import PositionEmbeddingSine


def _bilinear_zero_pad(img, x, y):
    """img [D, H, W]; (x, y) in pixel units where pixel (i, j) has its centre at (j, i)."""
    d, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(d, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx].double()
    return out


def _reference_ms_deform_attn(value, shapes, locations, weights):
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = locations.shape
    out = torch.zeros(n, q, m * d, dtype=torch.float64)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for qi in range(q):
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl + 1], head].T.reshape(d, h, w)
                    for pi in range(p):
                        lx, ly = locations[b, qi, head, lvl, pi].tolist()
                        sample = _bilinear_zero_pad(img, lx * w - 0.5, ly * h - 0.5)
                        acc += weights[b, qi, head, lvl, pi].item() * sample
                out[b, qi, head * d : (head + 1) * d] = acc
    return out


def test_ms_deform_attn_matches_explicit_loops():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 1)]
    n, m, d, q, p = 2, 3, 4, 5, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d)
    # Locations partly outside [0, 1] to exercise the zero padding.
    locations = torch.rand(n, q, m, len(shapes), p, 2) * 1.4 - 0.2
    weights = torch.rand(n, q, m, len(shapes), p)
    start = torch.tensor([0, 35, 47])
    got = ms_deform_attn(value, torch.tensor(shapes), start, locations, weights)
    want = _reference_ms_deform_attn(value, shapes, locations, weights)
    assert got.shape == (n, q, m * d)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # A list of shapes gives the same result as a tensor.
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, locations, weights), got)


def test_ms_deform_attn_gradients_match_finite_differences():
    # Value, sampling locations and attention weights all receive gradients (double precision
    # gradcheck; locations partly outside the maps to exercise the zero padding).
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    n, m, d, q, p = 1, 2, 3, 4, 2
    value = torch.randn(n, 16, m, d, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(n, q, m, 2, p, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(n, q, m, 2, p, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, None, loc, w), (value, locations, weights)
    )


def _autograd_ms_deform_attn(value, shapes, locations, weights):
    """Per head and level: F.grid_sample, times the weights, summed; gradients by autograd."""
    n, _, m, d = value.shape
    q = locations.shape[1]
    out, start = 0, 0
    for lvl, (h, w) in enumerate(shapes):
        img = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        start += h * w
        grid = (2 * locations[:, :, :, lvl] - 1).transpose(1, 2).reshape(n * m, q, -1, 2)
        sampled = F.grid_sample(img, grid, align_corners=False)  # [N*M, D, Q, P]
        wts = weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, q, -1)
        out = out + (sampled * wts).sum(-1)  # [N*M, D, Q]
    return out.view(n, m, d, q).permute(0, 3, 1, 2).reshape(n, q, m * d)


@pytest.mark.parametrize("needs", [(False, True, False), (True, False, True), (False, False, True)])
def test_ms_deform_attn_gradients_of_a_subset_of_inputs(needs):
    # The backward computes only what is asked for; each asked gradient equals the one autograd
    # gives through the explicit-loop reference.
    torch.manual_seed(1)
    shapes = [(3, 4), (2, 2)]
    n, m, d, q, p = 2, 2, 3, 4, 2
    inputs = [
        torch.randn(n, 16, m, d, dtype=torch.float64),
        torch.rand(n, q, m, 2, p, 2, dtype=torch.float64) * 1.2 - 0.1,
        torch.rand(n, q, m, 2, p, dtype=torch.float64),
    ]
    for x, need in zip(inputs, needs, strict=True):
        x.requires_grad_(need)
    value, locations, weights = inputs
    grad_out = torch.randn(n, q, m * d, dtype=torch.float64)
    asked = [x for x in inputs if x.requires_grad]
    got = torch.autograd.grad(ms_deform_attn(value, shapes, None, locations, weights), asked, grad_out)
    want = torch.autograd.grad(_autograd_ms_deform_attn(value, shapes, locations, weights), asked, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_ms_deform_attn_cpu_sparse_path_equals_grid_sample_at_the_borders():
    # On a CPU ms_deform_attn runs as sparse-matrix products over zero-padded maps; forward and
    # every gradient must equal grid_sample + autograd, also for points exactly on the map's
    # edges (0, 1), on the last pixel centre, just outside, and far outside.
    torch.manual_seed(2)
    shapes = [(4, 6), (3, 3), (1, 2)]
    n, m, d, q, p = 2, 2, 5, 7, 4
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, dtype=torch.float64, requires_grad=True)
    edges = torch.tensor([0.0, 1.0, -1e-9, 1 + 1e-9, -3.0, 4.0, 0.5, 1 - 1 / 12], dtype=torch.float64)
    locations = edges[torch.randint(len(edges), (n, q, m, len(shapes), p, 2))]
    locations = (locations + 0.02 * torch.rand_like(locations) * (torch.rand_like(locations) < 0.3))
    locations.requires_grad_()
    weights = torch.rand(n, q, m, len(shapes), p, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(n, q, m * d, dtype=torch.float64)
    inputs = (value, locations, weights)
    got = ms_deform_attn(value, shapes, None, locations, weights)
    want = _autograd_ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, inputs, grad_out),
                    torch.autograd.grad(want, inputs, grad_out), strict=True):
        torch.testing.assert_close(g, w)


def test_ms_deform_attn_non_finite_location_gives_nan_like_grid_sample():
    value = torch.arange(12.0).view(1, 12, 1, 1)  # one 3x4 level
    loc = torch.tensor([[float("nan"), 0.5], [float("inf"), 0.5], [0.5, -float("inf")], [0.5, 0.5]])
    out = ms_deform_attn(value, [(3, 4)], None, loc.view(1, 4, 1, 1, 1, 2), torch.ones(1, 4, 1, 1, 1))
    assert out[0, :3].isnan().all()
    assert out[0, 3].item() == pytest.approx(5.5)


def test_ms_deform_attn_is_bitwise_repeatable():
    torch.manual_seed(3)
    shapes = [(8, 8), (4, 4)]
    value = torch.randn(2, 80, 4, 8, requires_grad=True)
    locations = torch.rand(2, 80, 4, 2, 4, 2, requires_grad=True)
    weights = torch.rand(2, 80, 4, 2, 4, requires_grad=True)
    grad_out = torch.randn(2, 80, 32)
    runs = []
    for _ in range(2):
        out = ms_deform_attn(value, shapes, None, locations, weights)
        runs.append([out, *torch.autograd.grad(out, (value, locations, weights), grad_out)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_ms_deform_attn_pixel_centre_reads_exact_value():
    value = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1)  # one 2x3 level
    # Centre of pixel (row 1, col 2) is at ((2 + 0.5) / 3, (1 + 0.5) / 2).
    loc = torch.tensor([2.5 / 3, 1.5 / 2]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(2, 3)], None, loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(5.0)


def test_msdeformattn_init_grid_and_gradients_reach_offsets():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    # Head 0 points along +x, head 1 along +y; point k at distance k + 1.
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(
        bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0
    )
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = [(4, 6), (2, 3)]
    src = torch.randn(2, 30, 16)
    ref = torch.rand(1, 30, 2, 2)
    attn(src, ref, src, shapes).square().sum().backward()
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert attn.sampling_offsets.bias.grad.abs().sum() > 0


def test_position_embedding_sine_values():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=True)
    pos = pe(torch.zeros(1, 1, 2, 3))
    assert pos.shape == (1, 8, 2, 3)
    scale = 2 * math.pi
    # y channel 0 at row 0: sin(1/2 * 2pi); x channel 3 at column 1: cos((2/3 * 2pi) / 100^(2/4)).
    assert pos[0, 0, 0, 0].item() == pytest.approx(math.sin(0.5 * scale), abs=1e-5)
    assert pos[0, 7, 1, 1].item() == pytest.approx(math.cos(2 / 3 * scale / 10), abs=1e-5)
    assert pos[0, 1, 1, 2].item() == pytest.approx(math.cos(1.0 * scale), abs=1e-5)
    assert pos[0, 2, 0, 1].item() == pytest.approx(math.sin(0.5 * scale / 10), abs=1e-5)


def _features(b, h, w, channels):
    return [
        torch.randn(b, c, math.ceil(h / s), math.ceil(w / s))
        for c, s in zip(channels, [4, 8, 16, 32], strict=True)
    ]


def test_pixel_decoder_shapes_non_square():
    torch.manual_seed(0)
    channels = [16, 24, 40, 64]
    dec = MSDeformAttnPixelDecoder(
        channels, conv_dim=64, mask_dim=48, num_layers=2, nheads=4, n_points=2, dim_feedforward=96
    )
    mask_features, multi_scale = dec(_features(2, 96, 128, channels))
    assert mask_features.shape == (2, 48, 24, 32)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 64, 3, 4), (2, 64, 6, 8), (2, 64, 12, 16)]
    assert dec.input_proj[0][1].num_groups == 32  # 64 channels: GroupNorm(32) as in Mask2Former
    assert torch.isfinite(mask_features).all()


def test_pixel_decoder_zero_layers_and_small_dims():
    torch.manual_seed(0)
    channels = [8, 8, 8, 8]
    dec = MSDeformAttnPixelDecoder(channels, conv_dim=24, mask_dim=8, num_layers=0, nheads=2)
    assert dec.input_proj[0][1].num_groups == 24
    feats = _features(1, 64, 96, channels)
    mask_features, multi_scale = dec(feats)
    assert mask_features.shape == (1, 8, 16, 24)
    # Without encoder layers the 1/8 map is just the projection of res3.
    torch.testing.assert_close(multi_scale[2], dec.input_proj[2](feats[1]))


def test_pixel_decoder_gradients_and_autocast_fp32():
    torch.manual_seed(0)
    channels = [8, 16, 16, 32]
    dec = MSDeformAttnPixelDecoder(
        channels, conv_dim=32, mask_dim=32, num_layers=1, nheads=4, n_points=2, dim_feedforward=64
    )
    feats = [f.requires_grad_() for f in _features(1, 64, 64, channels)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, multi_scale = dec(feats)
    assert mask_features.dtype == torch.float32
    (mask_features.sum() + sum(x.sum() for x in multi_scale)).backward()
    offsets = dec.layers[0].self_attn.sampling_offsets
    assert offsets.weight.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in feats)
