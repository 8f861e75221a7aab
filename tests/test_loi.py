"""LOI initialization (DESIGN.md §7) against a dense gradient reference."""
import copy

import pytest
import torch
from torch import nn

from riemann_diffusion import inject_adapters, iter_adapters
from riemann_diffusion.loi import loi_init, sketch_gradients
from riemann_diffusion.manifold import tangent_gradient
from riemann_diffusion.tiny import make_tiny_unet


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 10, generator=g), torch.randn(32, 5, generator=g)


def noisy_mse(model, batch):
    """Draws noise inside: LOI must re-seed every pass so G stays the same."""
    x, y = batch
    return ((model(x + 0.1 * torch.randn_like(x)) - y) ** 2).mean()


def dense_grads(net, batch, names, seed=0):
    ref = copy.deepcopy(net)
    torch.manual_seed(seed)
    noisy_mse(ref, batch).backward()
    return {n: ref.get_submodule(n).weight.grad.double() for n in names}


@pytest.mark.parametrize("rank", [1, 2])
def test_first_riemannian_gradient_is_rank_2r_truncated_svd(rank):
    net, batch = _net(), _batch()
    G = dense_grads(net, batch, ["0", "2"])
    x = batch[0]
    with torch.no_grad():
        base = net(x)
    inject_adapters(net, targets=["0", "2"], rank=rank, init="loi", batch=batch, loss_fn=noisy_mse,
                    power_iters=8, loi_seed=0)
    with torch.no_grad():  # X0 = X: the output at step 0 is the base model's
        torch.testing.assert_close(net(x), base, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    noisy_mse(net, batch).backward()
    for name, layer in iter_adapters(net):
        A_L, B = (t.double() for t in layer.factors())
        xi, B_R = tangent_gradient(A_L, B, layer.lora_A.grad, layer.lora_B.grad)
        grad = xi.A_dot @ B_R.T + A_L @ xi.B_dot.T
        U, S, Vh = torch.linalg.svd(G[name])
        ref = (U[:, : 2 * rank] * S[: 2 * rank]) @ Vh[: 2 * rank]
        assert (grad - ref).norm() / ref.norm() < 1e-4
        assert (grad - G[name]).norm() > 1e-3 * G[name].norm()  # a real truncation, not G itself
        # X0 = α U[:, :r] V[:, r:2r]ᵀ with α = −1/√r (singular vectors have free signs:
        # compare the column spaces and the norm ‖X0‖ = |α|√r = 1)
        U1, V2 = U[:, :rank], Vh[rank : 2 * rank].T
        torch.testing.assert_close(A_L @ A_L.T, U1 @ U1.T, rtol=0, atol=1e-4)
        torch.testing.assert_close(B_R @ B_R.T, V2 @ V2.T, rtol=0, atol=1e-4)
        assert (A_L @ B.T).norm().item() == pytest.approx(1.0, rel=1e-5)
        torch.testing.assert_close(A_L.T @ A_L, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-6)


def test_sketch_products_equal_dense_products_in_one_pass():
    net, batch = _net(), _batch()
    G = dense_grads(net, batch, ["0", "2", "4"], seed=3)
    inject_adapters(net, targets=["0", "2", "4"], rank=1)
    layers = dict(iter_adapters(net))
    g = torch.Generator().manual_seed(0)
    N = {n: torch.randn(l.in_features, 3, generator=g) for n, l in layers.items()}
    M = {n: torch.randn(l.out_features, 3, generator=g) for n, l in layers.items()}
    calls = []
    GN, GtM = sketch_gradients(net, layers, batch, lambda m, b: calls.append(1) or noisy_mse(m, b), N, M, seed=3)
    assert len(calls) == 1  # every layer's products from a single backward pass
    for n in layers:
        torch.testing.assert_close(GN[n].double(), G[n] @ N[n].double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(GtM[n].double(), G[n].T @ M[n].double(), rtol=1e-4, atol=1e-7)
        assert layers[n].lora_A.grad is None  # no gradient left behind


def test_loi_on_tiny_unet_keeps_output_and_counts_passes():
    unet = make_tiny_unet("sd15")
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g))

    calls = []

    def loss_fn(model, b):
        calls.append(1)
        x, ehs = b
        return model(x, 10, ehs).sample.pow(2).mean()

    with torch.no_grad():
        ref = unet(*batch[:1], 10, batch[1]).sample
    inject_adapters(unet, "auto", rank=2, init="loi", batch=batch, loss_fn=loss_fn, power_iters=2)
    assert len(calls) == 2 * 2 + 2
    assert all(p.grad is None for p in unet.parameters())
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(unet(batch[0], 10, batch[1]).sample, ref, rtol=0, atol=1e-5)


def test_loi_errors():
    net, batch = _net(), _batch()
    with pytest.raises(TypeError, match="loss_fn"):
        inject_adapters(net, targets=["0"], rank=1, init="loi", batch=batch)
    net = _net()
    with pytest.raises(ValueError, match="2r"):  # 12×16 layer, r = 7: 2r > 12
        inject_adapters(net, targets=["2"], rank=7, init="loi", batch=batch, loss_fn=noisy_mse)
    net = _net()
    inject_adapters(net, targets=["0"], rank=1)
    with pytest.raises(ValueError, match="power_iters"):
        loi_init(net, batch, noisy_mse, power_iters=-1)
    with pytest.raises(ValueError, match="not finite"):
        loi_init(net, batch, lambda m, b: noisy_mse(m, b) * float("nan"), power_iters=0)
