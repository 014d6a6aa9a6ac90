import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdistill.model import token_linear as tl
from gdistill.model.decoder import TokenAttention
from gdistill.model.pixel_decoder import DeformableEncoderLayer, _reference_points

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="the oneDNN route needs a build with oneDNN"
)


@pytest.fixture
def route(monkeypatch):
    """Force the oneDNN route on or off, whatever this CPU's vendor."""

    def set_route(on: bool) -> None:
        monkeypatch.setattr(tl, "ONEDNN_LINEAR", on)

    return set_route


def _grads(fn, inputs, grad_out):
    out = fn()
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def test_token_linear_equals_f_linear_with_gradients(route):
    torch.manual_seed(0)
    x = torch.randn(3, 700, 64, requires_grad=True)  # 2 100 x 64 x 80 >= MIN_MACS
    weight = torch.randn(80, 64, requires_grad=True)
    bias = torch.randn(80, requires_grad=True)
    grad_out = torch.randn(3, 700, 80)
    route(True)
    assert tl.onednn_route(x, weight)
    got = _grads(lambda: tl.token_linear(x, weight, bias), (x, weight, bias), grad_out)
    want = _grads(lambda: F.linear(x, weight, bias), (x, weight, bias), grad_out)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert got[0].is_contiguous()
    no_bias = tl.token_linear(x.detach(), weight.detach(), None)
    torch.testing.assert_close(no_bias, x.detach() @ weight.detach().T, rtol=1e-4, atol=1e-4)


def test_token_linear_hand_computed_values(route):
    route(True)
    rows = -(-tl.MIN_MACS // 6)
    x = torch.zeros(rows, 2)
    x[0] = torch.tensor([1.0, 2.0])
    x[-1] = torch.tensor([-3.0, 0.5])
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 4.0]])
    bias = torch.tensor([0.5, 0.0, -1.0])
    out = tl.token_linear(x, weight, bias)
    assert tl.onednn_route(x, weight)
    assert out.shape == (rows, 3)
    assert out[0].tolist() == [3.5, 0.0, 7.0]
    assert out[-1].tolist() == [-2.0, -6.5, 1.0]
    assert out[1].tolist() == [0.5, 0.0, -1.0]


def test_route_is_taken_only_where_it_pays(route):
    weight = torch.randn(8, 16)
    big = torch.randn(2, -(-tl.MIN_MACS // (2 * 16 * 8)), 16)  # just MIN_MACS multiply-adds
    route(True)
    assert tl.onednn_route(big, weight)
    assert not tl.onednn_route(big[:, :-1], weight)  # fewer
    assert not tl.onednn_route(big.double(), weight.double())
    route(False)
    assert not tl.onednn_route(big, weight)


def test_route_is_chosen_by_vendor_and_vector_width():
    # AVX-512 AMD: oneDNN 1.3-1.9x faster; AVX2-only AMD (Zen 3): MKL faster; Intel: MKL.
    assert tl.onednn_pays_off(True, "AVX512")
    assert not tl.onednn_pays_off(True, "AVX2")
    assert not tl.onednn_pays_off(True, "DEFAULT")
    assert not tl.onednn_pays_off(False, "AVX512")


def test_route_is_bitwise_repeatable(route):
    route(True)
    torch.manual_seed(1)
    layer = tl.TokenLinear(32, 64)
    x = torch.randn(2, 1500, 32, requires_grad=True)
    grad_out = torch.randn(2, 1500, 64)
    first = _grads(lambda: layer(x), (x, layer.weight, layer.bias), grad_out)
    second = _grads(lambda: layer(x), (x, layer.weight, layer.bias), grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_token_linear_module_keeps_nn_linear_state_dict():
    layer = tl.TokenLinear(5, 7)
    plain = nn.Linear(5, 7)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), plain(x))


def test_token_attention_equals_multihead_attention_with_mask(route):
    torch.manual_seed(2)
    b, q, s, c, heads = 2, 6, 600, 96, 4  # key projection 1 200 x 96 x 96 >= MIN_MACS
    attn = TokenAttention(c, heads, dropout=0.0, batch_first=True)
    reference = nn.MultiheadAttention(c, heads, dropout=0.0, batch_first=True)
    reference.load_state_dict(attn.state_dict())
    query = torch.randn(b, q, c, requires_grad=True)
    key = torch.randn(b, s, c, requires_grad=True)
    value = torch.randn(b, s, c, requires_grad=True)
    mask = torch.rand(b * heads, q, s) < 0.7
    mask[:, :, 0] = False  # no query blocked everywhere
    grad_out = torch.randn(b, q, c)
    inputs = (query, key, value, attn.in_proj_weight, attn.out_proj.weight)
    route(True)
    assert tl.onednn_route(key, attn.in_proj_weight)
    got = _grads(lambda: attn(query, key, value, mask), inputs, grad_out)
    ref_inputs = (query, key, value, reference.in_proj_weight, reference.out_proj.weight)
    want = _grads(
        lambda: reference(query, key, value, attn_mask=mask, need_weights=False)[0], ref_inputs, grad_out
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    route(False)  # the fallback is nn.MultiheadAttention itself
    assert torch.equal(attn(query, key, value, mask), want[0])


def test_token_attention_self_attention_without_mask(route):
    torch.manual_seed(4)
    attn = TokenAttention(96, 4, dropout=0.0, batch_first=True)
    reference = nn.MultiheadAttention(96, 4, dropout=0.0, batch_first=True)
    reference.load_state_dict(attn.state_dict())
    x = torch.randn(4, 300, 96)
    route(True)
    assert tl.onednn_route(x, attn.in_proj_weight[:96])
    torch.testing.assert_close(
        attn(x, x, x), reference(x, x, x, need_weights=False)[0], rtol=1e-4, atol=1e-4
    )


def test_encoder_layer_same_result_on_both_routes(route):
    torch.manual_seed(3)
    shapes = [(8, 8), (16, 16), (32, 32)]
    layer = DeformableEncoderLayer(96, 192, 3, 4, 4)  # value projection 1 344 x 96 x 96 MACs
    src = torch.randn(1, sum(h * w for h, w in shapes), 96, requires_grad=True)
    pos = torch.randn_like(src)
    ref = _reference_points(shapes, 3, src.device)
    grad_out = torch.randn_like(src)
    params = (src, *layer.parameters())
    results = []
    for on in (True, False):
        route(on)
        results.append(_grads(lambda: layer(src, pos, ref, shapes), params, grad_out))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_tracing_keeps_f_linear(route):
    route(True)
    layer = tl.TokenLinear(4, 3)
    x = torch.randn(-(-tl.MIN_MACS // 12), 4)
    graph = torch.jit.trace(layer, (x,)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::linear" in kinds
    assert "aten::_convolution" not in kinds and "aten::conv2d" not in kinds
