"""Riemannion against independent dense references, gauge invariance, state round trips."""

import copy

import pytest
import torch
from conftest import dense_ortho, dense_project, dense_svd_r
from torch import nn

from riemann_diffusion import Riemannion, adapter_parameters, inject_adapters, iter_adapters


def _problem(m=14, n=10, r=3, seed=0, dtype=torch.float64):
    """A single adapted linear layer and a fixed regression batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m, bias=False)).to(dtype)
    inject_adapters(model, targets=["0"], rank=r, init_scale=0.5, seed=seed)
    layer = model[0]
    if dtype == torch.float64:  # re-draw the start in float64 (the default init is fp32-orthonormal)
        layer.double()
        g0 = torch.Generator().manual_seed(seed + 100)
        A_L = torch.linalg.qr(torch.randn(m, r, generator=g0, dtype=dtype))[0]
        layer.set_start(A_L, 0.5 * torch.randn(n, r, generator=g0, dtype=dtype))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, n, generator=g, dtype=dtype)
    t = torch.randn(32, m, generator=g, dtype=dtype)
    return model, layer, x, t


def _loss_and_dense_grad(layer, x, t):
    """Loss at the layer's current point and the dense gradient G = ∂L/∂W (reference)."""
    W = (layer.base_layer.weight.detach() + layer.delta_weight().to(x.dtype)).clone().requires_grad_(True)
    loss = ((torch.tanh(x @ W.T) - t) ** 2).mean()
    loss.backward()
    return W.grad


def _step(model, layer, x, t, opt):
    opt.zero_grad()
    ((torch.tanh(model(x)) - t) ** 2).mean().backward()
    opt.step()


def _X(layer):
    A, B = layer.factors()
    return (A @ B.T).double()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_first_heavy_ball_step_equals_dense_reference(wd):
    model, layer, x, t = _problem()
    r, lr, beta = layer.rank, 0.7, 0.9
    X = _X(layer)
    G = _loss_and_dense_grad(layer, x, t)
    opt = Riemannion(adapter_parameters(model), lr=lr, momentum=beta, weight_decay=wd)
    _step(model, layer, x, t, opt)
    ref = dense_svd_r((1 - lr * wd) * X - lr * (1 - beta) * dense_project(X, G, r), r)
    torch.testing.assert_close(_X(layer), ref, rtol=1e-9, atol=1e-10)


def test_first_muon_step_equals_dense_reference():
    model, layer, x, t = _problem(seed=3)
    r, lr = layer.rank, 0.05
    X = _X(layer)
    G = _loss_and_dense_grad(layer, x, t)
    opt = Riemannion(adapter_parameters(model), lr=lr, momentum=0.9, rule="muon")
    _step(model, layer, x, t, opt)
    ref = dense_svd_r(X - lr * dense_project(X, dense_ortho(dense_project(X, G, r)), r), r)
    torch.testing.assert_close(_X(layer), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rule", ["heavy_ball", "muon"])
def test_several_steps_equal_dense_algorithm(rule):
    """Five steps including momentum transport, against a dense re-implementation."""
    model, layer, x, t = _problem(seed=5)
    r, lr, beta = layer.rank, 0.3 if rule == "heavy_ball" else 0.05, 0.8
    opt = Riemannion(adapter_parameters(model), lr=lr, momentum=beta, rule=rule)
    ref_layer = copy.deepcopy(layer)
    X = _X(layer)
    M = torch.zeros_like(X)
    for _ in range(5):
        ref_layer.set_point(*_factor(X, r))
        G = _loss_and_dense_grad(ref_layer, x, t)
        g = dense_project(X, G, r)
        M = dense_project(X, M, r)  # transport = re-projection at the current point
        if rule == "heavy_ball":
            M = beta * M + (1 - beta) * g
            D = M
        else:
            M = beta * M + g
            D = dense_project(X, dense_ortho(M), r)
        X = dense_svd_r(X - lr * D, r)
        _step(model, layer, x, t, opt)
        torch.testing.assert_close(_X(layer), X, rtol=1e-8, atol=1e-9)


def _factor(X, r):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :r], Vh[:r].T * S[:r]


def _train(model, x, t, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        ((torch.tanh(model(x)) - t) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("rule", ["heavy_ball", "muon"])
def test_gauge_invariance(rule):
    """Same X written as (A_L, B) and (A_L Q, B Q): same iterates over 50 steps."""
    m, n, r = 16, 12, 3
    model1, layer1, x, t = _problem(m, n, r, seed=7)
    model2 = copy.deepcopy(model1)
    layer2 = model2[0]
    Q = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    A, B = layer1.factors()
    with torch.no_grad():  # write the other gauge directly (set_point would canonicalize it)
        layer2.lora_A.copy_(A @ Q)
        layer2.lora_B.copy_(B @ Q)
    assert not torch.allclose(layer2.lora_B, layer1.lora_B)
    lr = 0.3 if rule == "heavy_ball" else 0.02
    opts = [Riemannion(adapter_parameters(mm), lr=lr, momentum=0.9, rule=rule) for mm in (model1, model2)]
    for _ in range(50):
        for mm, opt in zip((model1, model2), opts):
            _train(mm, x, t, opt, 1)
        X1, X2 = _X(layer1), _X(layer2)
        assert float((X1 - X2).norm() / X1.norm()) < 1e-6


def test_adam_on_plain_factors_is_not_gauge_invariant():
    """Control: Adam on A, B of a plain LoRA gives different iterates for (A C, B C⁻ᵀ)."""
    torch.manual_seed(0)
    m, n, r = 16, 12, 3
    A = torch.randn(m, r, dtype=torch.float64)
    B = torch.randn(n, r, dtype=torch.float64)
    C = torch.tensor([[2.0, 0.3, 0.0], [0.0, 0.5, 0.1], [0.2, 0.0, 1.0]], dtype=torch.float64)
    x = torch.randn(32, n, dtype=torch.float64)
    t = torch.randn(32, m, dtype=torch.float64)
    runs = []
    for a0, b0 in ((A, B), (A @ C, B @ torch.linalg.inv(C).T)):
        a, b = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
        opt = torch.optim.Adam([a, b], lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            ((torch.tanh(x @ (a @ b.T).T) - t) ** 2).mean().backward()
            opt.step()
        runs.append((a @ b.T).detach())
    torch.testing.assert_close(A @ B.T, (A @ C) @ (B @ torch.linalg.inv(C).T).T)  # same start
    assert float((runs[0] - runs[1]).norm() / runs[0].norm()) > 1e-3


@pytest.mark.parametrize("rule", ["heavy_ball", "muon"])
def test_orthonormality_and_rank_over_2000_float32_steps(rule):
    model, layer, x, t = _problem(40, 30, 4, seed=2, dtype=torch.float32)
    opt = Riemannion(adapter_parameters(model), lr=0.5 if rule == "heavy_ball" else 0.01, momentum=0.9, rule=rule)
    eye = torch.eye(4)
    worst = 0.0
    for i in range(2000):
        _train(model, x, t, opt, 1)
        if i % 100 == 99:
            A, B = layer.factors()
            worst = max(worst, float((A.T @ A - eye).abs().max()))
            s = torch.linalg.svdvals(A @ B.T)
            assert s[3] > 1e-3 * s[0], f"rank collapsed at step {i}: {s}"
    assert A.dtype == torch.float32
    assert worst < 1e-5


def _multi_layer_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 6)
    )
    inject_adapters(model, targets=r"\d", rank=3, init_scale=0.3)
    return model


@pytest.mark.parametrize("rule", ["heavy_ball", "muon"])
def test_batched_equals_per_layer(rule):
    m1 = _multi_layer_model()
    m2 = copy.deepcopy(m1)
    x, t = torch.randn(20, 8), torch.randn(20, 6)
    o1 = Riemannion(adapter_parameters(m1), lr=0.05, rule=rule, weight_decay=0.01, batched=True)
    o2 = Riemannion(adapter_parameters(m2), lr=0.05, rule=rule, weight_decay=0.01, batched=False)
    _train(m1, x, t, o1, 10)
    _train(m2, x, t, o2, 10)
    for (_, l1), (_, l2) in zip(iter_adapters(m1), iter_adapters(m2)):
        torch.testing.assert_close(l1.lora_A @ l1.lora_B.T, l2.lora_A @ l2.lora_B.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["heavy_ball", "muon"])
def test_state_dict_round_trip_continues_exact_trajectory(rule):
    x, t = torch.randn(20, 8), torch.randn(20, 6)
    m1 = _multi_layer_model(1)
    o1 = Riemannion(adapter_parameters(m1), lr=0.05, momentum=0.9, rule=rule)
    _train(m1, x, t, o1, 5)
    model_state = copy.deepcopy(m1.state_dict())
    opt_state = copy.deepcopy(o1.state_dict())
    _train(m1, x, t, o1, 5)

    m2 = _multi_layer_model(99)  # different init, overwritten by the checkpoint
    m2.load_state_dict(model_state)
    o2 = Riemannion(adapter_parameters(m2), lr=0.05, momentum=0.9, rule=rule)
    o2.load_state_dict(opt_state)
    _train(m2, x, t, o2, 5)
    for p1, p2 in zip(adapter_parameters(m1), adapter_parameters(m2)):
        assert torch.equal(p1, p2)
    assert float(o2.state[adapter_parameters(m2)[0]]["step"]) == 10


def test_param_groups_with_own_lr():
    x, t = torch.randn(20, 8), torch.randn(20, 6)
    m1 = _multi_layer_model(2)
    m2 = copy.deepcopy(m1)
    p1 = adapter_parameters(m1)
    o1 = Riemannion([{"params": p1[:4], "lr": 0.1}, {"params": p1[4:], "lr": 0.01}], momentum=0.5)
    p2 = adapter_parameters(m2)
    oa = Riemannion(p2[:4], lr=0.1, momentum=0.5)
    ob = Riemannion(p2[4:], lr=0.01, momentum=0.5)
    for _ in range(3):
        for opt_list, mm in (([o1], m1), ([oa, ob], m2)):
            for o in opt_list:
                o.zero_grad()
            ((torch.tanh(mm(x)) - t) ** 2).mean().backward()
            for o in opt_list:
                o.step()
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(p1[0], _multi_layer_model(2)[0].lora_A)


def test_loss_decreases():
    model = _multi_layer_model(3)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a reachable target: every base weight plus a rank-2 change
        for _, layer in iter_adapters(teacher):
            W = layer.base_layer.weight
            W += 0.5 * torch.randn(W.shape[0], 2) @ torch.randn(2, W.shape[1]) / W.shape[1] ** 0.5
        x = torch.randn(64, 8)
        t = teacher(x)
    opt = Riemannion(adapter_parameters(model), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(rule="adam"), "rule"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    model = _multi_layer_model()
    with pytest.raises(ValueError, match=match):
        Riemannion(adapter_parameters(model), **kwargs)


def test_bad_group_hyperparameter():
    model = _multi_layer_model()
    with pytest.raises(ValueError, match="learning rate"):
        Riemannion([{"params": adapter_parameters(model), "lr": -1.0}])


def test_bad_rank_and_pairing():
    with pytest.raises(ValueError, match="rank"):
        Riemannion([nn.Parameter(torch.zeros(4, 5)), nn.Parameter(torch.zeros(3, 5))])
    with pytest.raises(ValueError, match="rank"):
        inject_adapters(nn.Sequential(nn.Linear(4, 3)), targets=["0"], rank=4)
    with pytest.raises(ValueError, match="rank"):
        inject_adapters(nn.Sequential(nn.Linear(4, 3)), targets=["0"], rank=0)
    params = adapter_parameters(_multi_layer_model())
    with pytest.raises(ValueError, match="pairs"):
        Riemannion(params[:-1])
    with pytest.raises(ValueError, match="orthonormal"):
        Riemannion([params[1], params[0]])  # (B, A): wrong order


def test_low_precision_adapter_factors_are_rejected_with_advice():
    model = _multi_layer_model()
    model.to(torch.bfloat16)  # casts the adapter factors too: the maths would lose orthonormality
    with pytest.raises(ValueError, match="before inject_adapters"):
        Riemannion(adapter_parameters(model))
