"""The adapter layer: one-backward tangent gradients, X0 handling, merge, dtypes."""

import pytest
import torch
from conftest import dense_project
from torch import nn

from riemann_diffusion.layer import RiemannLinear
from riemann_diffusion.manifold import tangent_gradient


def _layer(m=12, n=9, r=3, seed=0, dtype=torch.float32, init_scale=0.3):
    torch.manual_seed(seed)
    base = nn.Linear(n, m).to(dtype)
    return RiemannLinear(base, r, init_scale=init_scale, generator=torch.Generator().manual_seed(seed))


def _moved(layer, seed=1):
    """Move X away from X0 so the tests see a non-trivial point."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(layer.out_features, layer.rank, generator=g))[0]
    B = torch.randn(layer.in_features, layer.rank, generator=g)
    layer.set_point(A, B)
    return layer


def test_output_at_start_equals_base():
    layer = _layer()
    x = torch.randn(5, 9)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)
    assert torch.count_nonzero(layer.delta_weight()).item() == 0 or layer.delta_weight().abs().max() < 1e-7


def test_forward_applies_x_minus_x0():
    layer = _moved(_layer())
    x = torch.randn(4, 9, dtype=torch.float32)
    W = layer.base_layer.weight.detach() + layer.delta_weight()
    ref = x @ W.T + layer.base_layer.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the cheaper inference path agrees
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_backward_gives_tangent_gradient(seed):
    """A.grad = G B, B.grad = Gᵀ A_L, and the tangent gradient from them = dense P_X(G)."""
    layer = _moved(_layer(seed=seed).double(), seed)
    layer.lora_A.data = layer.lora_A.data.double()
    x = torch.randn(7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    t = torch.randn(7, 12, dtype=torch.float64)
    loss = ((torch.sin(layer(x)) - t) ** 2).sum()
    loss.backward()
    # dense reference: G = ∂L/∂W_eff computed on a plain dense weight
    W_eff = (layer.base_layer.weight.detach() + layer.delta_weight().double()).clone().requires_grad_(True)
    ((torch.sin(x @ W_eff.T + layer.base_layer.bias) - t) ** 2).sum().backward()
    G = W_eff.grad
    A_L, B = (f.double() for f in layer.factors())
    torch.testing.assert_close(layer.lora_A.grad.double(), G @ B, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad.double(), G.T @ A_L, rtol=1e-6, atol=1e-6)
    xi, B_R = tangent_gradient(A_L, B, layer.lora_A.grad, layer.lora_B.grad)
    torch.testing.assert_close(B_R @ B_R.T @ B, B, rtol=1e-9, atol=1e-9)
    dense = xi.A_dot @ B_R.T + A_L @ xi.B_dot.T
    torch.testing.assert_close(dense, dense_project(A_L @ B.T, G, layer.rank), rtol=1e-6, atol=1e-6)


def test_base_weights_frozen_and_untouched():
    layer = _layer()
    W0 = layer.base_layer.weight.detach().clone()
    layer(torch.randn(3, 9)).sum().backward()
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert torch.equal(layer.base_layer.weight, W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base(dtype):
    layer = _moved(_layer(dtype=dtype))
    x = torch.randn(4, 9).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    assert layer.lora_B.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()
    W = layer.base_layer.weight.float() + layer.delta_weight()
    ref = x.float() @ W.T + layer.base_layer.bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_merge_unmerge_exact():
    layer = _moved(_layer())
    x = torch.randn(6, 9)
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, W0 + layer.delta_weight(), rtol=0, atol=1e-6)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W0)


def test_safe_merge_rejects_nan():
    layer = _moved(_layer())
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_scale_scales_update():
    layer = _moved(_layer())
    x = torch.randn(3, 9)
    with torch.no_grad():
        base = layer.base_layer(x)
        full = layer(x) - base
        layer.scale = 0.5
        torch.testing.assert_close(layer(x) - base, 0.5 * full, rtol=1e-5, atol=1e-6)
        layer.scale = 0.0
        assert torch.equal(layer(x), base)


def test_delta_factors_rank_2r():
    layer = _moved(_layer())
    up, down = layer.delta_factors()
    assert up.shape == (12, 6) and down.shape == (9, 6)
    A_L, B = layer.factors()
    A0, B0 = layer.start_factors()
    torch.testing.assert_close(layer.delta_weight(), A_L @ B.T - A0 @ B0.T)


def test_default_init_is_orthonormal_and_small():
    layer = _layer(init_scale=1e-3)
    A_L, B = layer.factors()
    torch.testing.assert_close(A_L.T @ A_L, torch.eye(3), rtol=0, atol=1e-6)
    ratio = float((A_L @ B.T).norm() / layer.base_layer.weight.norm())
    assert abs(ratio - 1e-3) < 1e-5


@pytest.mark.parametrize("rank", [0, -1, 10, 2.5])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        RiemannLinear(nn.Linear(9, 12), rank)


def test_factors_are_kept_in_canonical_form():
    """set_point keeps X and stores B with orthogonal columns (so R of B's QR is diagonal)."""
    layer = _layer()
    g = torch.Generator().manual_seed(3)
    A = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    B = torch.randn(9, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    layer.set_point(A, B)
    A_L, B_new = layer.factors()
    torch.testing.assert_close((A_L @ B_new.T).double(), A @ B.T, rtol=1e-5, atol=1e-6)
    gram = B_new.T @ B_new
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-5 * gram.abs().max()
    torch.testing.assert_close(A_L.T @ A_L, torch.eye(3), rtol=0, atol=1e-6)
