import pytest
import torch

from gdistill.engine.optim import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.head = torch.nn.Linear(4, 2)
    return model


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_fused_adamw_on_cpu_matches_the_reference_update():
    fused_model, ref_model = _model(), _model()
    opt = build_optimizer(fused_model, lr=1e-2, weight_decay=0.05, backbone_lr_mult=0.1)
    if torch.__version__ >= "2.4":  # CPU fused AdamW exists from torch 2.4
        assert all(group["fused"] for group in opt.param_groups)
    # The reference: the same groups with PyTorch's per-tensor AdamW.
    ref_groups = [
        {"params": [dict(ref_model.named_parameters())[n] for n in _names(fused_model, g["params"])],
         "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in opt.param_groups
    ]
    ref = torch.optim.AdamW(ref_groups, foreach=False)
    _train(fused_model, opt)
    _train(ref_model, ref)
    for (name, p), q in zip(fused_model.named_parameters(), ref_model.parameters(), strict=True):
        moved = (q - dict(_model().named_parameters())[name]).abs().max()
        assert moved > 1e-4, name  # the parameters did change
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _names(model: torch.nn.Module, params: list) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


def test_optimizer_state_round_trip():
    model = _model()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, backbone_lr_mult=0.1)
    _train(model, opt, steps=2)
    opt2 = build_optimizer(model, lr=1e-2, weight_decay=0.05, backbone_lr_mult=0.1)
    opt2.load_state_dict(opt.state_dict())
    state = opt2.state[model.head.weight]
    assert int(state["step"]) == 2
    assert state["exp_avg"].shape == model.head.weight.shape
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_a_fused_adamw_that_cannot_step_is_not_used(monkeypatch):
    """torch 2.1-2.3 build a fused AdamW for CPU parameters and fail at its first step."""

    class AdamWOfOldTorch(torch.optim.AdamW):
        def step(self, closure=None):
            if self.defaults.get("fused"):
                raise NotImplementedError("Could not run 'aten::_fused_adamw_' with the 'CPU' backend")
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", AdamWOfOldTorch)
    model = _model()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, backbone_lr_mult=0.1)
    assert not any(group.get("fused") for group in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
