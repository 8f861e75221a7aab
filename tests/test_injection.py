"""Target matching, injection, removal and merging on plain nn.Modules."""

import pytest
import torch
from torch import nn

from riemann_diffusion import (
    RiemannLinear,
    adapter_parameters,
    inject_adapters,
    iter_adapters,
    match_targets,
    merge_adapters,
    remove_adapters,
    set_adapter_scale,
    unmerge_adapters,
)


class Attn(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.to_q = nn.Linear(d, d)
        self.to_k = nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])

    def forward(self, x):
        return self.to_out[0](torch.tanh(self.to_q(x)) * self.to_k(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Attn(), Attn()])
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.proj(x)


CASES = [
    (["to_q"], ["blocks.0.to_q", "blocks.1.to_q"]),
    (["to_out.0", "proj"], ["blocks.0.to_out.0", "blocks.1.to_out.0", "proj"]),
    (["blocks.1.to_k"], ["blocks.1.to_k"]),
    (r"blocks\.0\.to_[qk]", ["blocks.0.to_q", "blocks.0.to_k"]),
    (r"to_q", []),  # a regex must match the full name
    (["o_q"], []),  # a suffix must be a whole dotted component
]


@pytest.mark.parametrize("targets,expected", CASES)
def test_target_matching(targets, expected):
    if expected:
        assert match_targets(Net(), targets) == expected
    else:
        with pytest.raises(ValueError, match="blocks.0.to_q"):  # lists what exists
            match_targets(Net(), targets)


def test_inject_keeps_output_and_yields_pairs():
    net = Net()
    x = torch.randn(3, 8)
    y0 = net(x)
    names = inject_adapters(net, targets=["to_q", "to_k"], rank=2)
    assert names == [n for n, _ in iter_adapters(net)]
    assert all(isinstance(layer, RiemannLinear) for _, layer in iter_adapters(net))
    torch.testing.assert_close(net(x), y0, rtol=0, atol=1e-6)
    params = adapter_parameters(net)
    assert len(params) == 8 and params[0].shape == (8, 2) and params[1].shape == (8, 2)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}


def test_remove_restores_bit_for_bit():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inject_adapters(net, targets=["to_q", "to_out.0"], rank=3)
    with torch.no_grad():
        for _, layer in iter_adapters(net):
            layer.lora_B.add_(1.0)
    merge_adapters(net, remove=False)
    assert remove_adapters(net) == 4
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, RiemannLinear) for m in net.modules())


def test_merge_fuses_delta_and_unmerge_restores():
    net = Net()
    inject_adapters(net, targets=["to_q", "to_k", "to_out.0"], rank=2)
    with torch.no_grad():
        for _, layer in iter_adapters(net):
            layer.lora_B.mul_(-3.0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = net(x)
        deltas = {n: layer.delta_weight().clone() for n, layer in iter_adapters(net)}
        W0 = {n: layer.base_layer.weight.clone() for n, layer in iter_adapters(net)}
        merge_adapters(net, remove=False)
        torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)
        assert unmerge_adapters(net) == 6
        for n, layer in iter_adapters(net):
            assert torch.equal(layer.base_layer.weight, W0[n])
        merge_adapters(net)  # default: fuse and drop the wrappers
        torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, RiemannLinear) for m in net.modules())
    torch.testing.assert_close(net.blocks[0].to_q.weight, W0["blocks.0.to_q"] + deltas["blocks.0.to_q"])


def test_set_adapter_scale_zero_gives_base():
    net = Net()
    x = torch.randn(2, 8)
    y0 = net(x)
    inject_adapters(net, targets=["to_q"], rank=2, init_scale=0.5)
    with torch.no_grad():
        for _, layer in iter_adapters(net):
            layer.lora_B.add_(0.3)
        assert not torch.allclose(net(x), y0)
        set_adapter_scale(net, 0.0)
        torch.testing.assert_close(net(x), y0)


def test_errors():
    net = Net()
    with pytest.raises(ValueError, match="rank"):
        inject_adapters(net, targets=["proj"], rank=5)  # min(4, 8) = 4
    assert not any(isinstance(m, RiemannLinear) for m in net.modules())  # nothing half-done
    with pytest.raises(ValueError, match="init"):
        inject_adapters(net, targets=["proj"], rank=2, init="gaussian")
    with pytest.raises(ValueError, match="regex"):
        inject_adapters(net, targets="to_q[", rank=2)
    inject_adapters(net, targets=["proj"], rank=2)
    with pytest.raises(ValueError, match="already"):
        inject_adapters(net, targets=["to_q"], rank=2)


def test_seed_makes_init_reproducible():
    a, b = Net(), Net()
    inject_adapters(a, targets=["to_q"], rank=2, seed=5)
    inject_adapters(b, targets=["to_q"], rank=2, seed=5)
    for pa, pb in zip(adapter_parameters(a), adapter_parameters(b)):
        assert torch.equal(pa, pb)
