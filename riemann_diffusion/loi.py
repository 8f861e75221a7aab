"""LOI: locally optimal initialization of the adapters from a gradient sketch (DESIGN.md §7).

For every adapted layer with weight W (m×n) and full-finetuning gradient
G = ∂L/∂W at the pretrained weights, LOI sets

    X0 = X = α · U[:, :r] · V[:, r:2r]ᵀ,     A_L = U[:, :r],  B = α V[:, r:2r]

from a rank-2r randomized SVD ``G ≈ U S Vᵀ``. Then the first Riemannian gradient
``P_X(G)`` is exactly the rank-2r truncated SVD of G (up to the sketch's accuracy),
and since X0 = X the model output at step 0 is the base model's.

G is never formed: every product ``G·N`` (m×k) and ``Gᵀ·M`` (n×k) comes from one
backward pass through *probe adapters* added to each layer's output,

    y = W x + x N Z1ᵀ + x Z2 Mᵀ,     Z1 = 0 (m×k), Z2 = 0 (n×k) leaves,

so that ``∂L/∂Z1 = G N`` and ``∂L/∂Z2 = Gᵀ M``. All layers share each backward
pass. A randomized SVD with q power iterations (Halko et al., Alg. 4.4) takes
2q + 2 passes; the paper's diffusion setting is α = −1/√r, q = 15, oversampling r.

``loss_fn(model, batch)`` must be deterministic given the torch RNG: every pass
runs under the same seed (noise and timesteps drawn inside ``loss_fn`` repeat).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .injection import INITIALIZERS, iter_adapters
from .layer import RiemannLinear

logger = logging.getLogger(__name__)

__all__ = ["loi_init", "sketch_gradients"]


@contextmanager
def _probes(layers: dict[str, RiemannLinear], right: dict[str, Tensor] | None, left: dict[str, Tensor] | None):
    """Attach probes to each layer's base output; yields {name: (Z1 | None, Z2 | None)}.

    right[name] = N (n×k) gives ∂L/∂Z1 = G N; left[name] = M (m×k) gives ∂L/∂Z2 = Gᵀ M.
    """
    leaves: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    handles = []
    for name, layer in layers.items():
        N = right.get(name) if right else None
        M = left.get(name) if left else None
        Z1 = torch.zeros(layer.out_features, N.shape[1], device=N.device, requires_grad=True) if N is not None else None
        Z2 = torch.zeros(layer.in_features, M.shape[1], device=M.device, requires_grad=True) if M is not None else None
        leaves[name] = (Z1, Z2)

        def hook(module, args, out, N=N, M=M, Z1=Z1, Z2=Z2):
            x = args[0].to(torch.float32)
            extra = 0
            if N is not None:
                extra = extra + (x @ N) @ Z1.T
            if M is not None:
                extra = extra + (x @ Z2) @ M.T
            return out + extra.to(out.dtype)

        handles.append(layer.base_layer.register_forward_hook(hook))
    try:
        yield leaves
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _frozen(model: nn.Module):
    """Every parameter ``requires_grad=False`` inside the block (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def sketch_gradients(
    model: nn.Module,
    layers: dict[str, RiemannLinear],
    batch,
    loss_fn: Callable,
    right: dict[str, Tensor] | None = None,
    left: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward/backward pass: ``({name: G N}, {name: Gᵀ M})`` for all layers at once.

    right: {name: N (n×k)}, left: {name: M (m×k)} (fp32, on the layer's device);
    G is each layer's gradient ∂L/∂W at the current model. The torch RNG is seeded
    with ``seed`` for the pass (and restored after), so repeated passes see the same G.
    """
    with _frozen(model), torch.random.fork_rng(devices=_devices(model)), _probes(layers, right, left) as leaves:
        torch.manual_seed(seed)
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor; got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))}")
            flat = [z for pair in leaves.values() for z in pair if z is not None]
            grads = torch.autograd.grad(loss.float().reshape(()), flat, allow_unused=True)
    it = iter(grads)
    GN, GtM = {}, {}
    for name, (Z1, Z2) in leaves.items():
        if Z1 is not None:
            g = next(it)
            GN[name] = torch.zeros_like(Z1) if g is None else g.detach()
        if Z2 is not None:
            g = next(it)
            GtM[name] = torch.zeros_like(Z2) if g is None else g.detach()
    return GN, GtM


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y)[0]


@torch.no_grad()
def loi_init(
    model: nn.Module,
    batch,
    loss_fn: Callable,
    *,
    alpha: float | None = None,
    power_iters: int = 15,
    oversample: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Set every adapter of ``model`` to its LOI start (X0 = X = α U[:, :r] V[:, r:2r]ᵀ).

    Args:
        model: a model with adapters already injected (any init).
        batch: passed to ``loss_fn`` unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; deterministic given the RNG.
        alpha: scale of X0; default −1/√r (the paper's diffusion setting).
        power_iters: q, power iterations of the randomized SVD (paper: 15); 2q + 2
            forward/backward passes in all.
        oversample: extra sketch columns beyond 2r (default r); capped at min(m, n).
        seed: seeds both the Gaussian test matrices and the RNG of each pass.

    Returns {layer name: singular values (2r,) of the gradient sketch} for logging.
    Raises ValueError if a layer has 2r > min(m, n) or the gradient is not finite.
    """
    layers = dict(iter_adapters(model))
    if not layers:
        raise ValueError("loi_init: the model has no Riemann adapters; call inject_adapters first")
    if not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be a non-negative integer; got {power_iters!r}")
    if oversample is not None and (not isinstance(oversample, int) or oversample < 0):
        raise ValueError(f"oversample must be a non-negative integer or None; got {oversample!r}")
    if loss_fn is None or not callable(loss_fn):
        raise TypeError("init='loi' needs loss_fn=callable(model, batch) -> scalar loss")
    gen = torch.Generator().manual_seed(seed)
    omega, ranks = {}, {}
    for name, layer in layers.items():
        m, n, r = layer.out_features, layer.in_features, layer.rank
        if 2 * r > min(m, n):
            raise ValueError(f"LOI needs 2r ≤ min(m, n); layer {name} is {m}×{n} with r={r}")
        k = min(2 * r + (r if oversample is None else oversample), m, n)
        omega[name] = torch.randn(n, k, generator=gen).to(layer.lora_A.device)
        ranks[name] = r

    def pass_(right=None, left=None):
        return sketch_gradients(model, layers, batch, loss_fn, right, left, seed=seed)

    # Adapters contribute X − X0 = 0 and need no gradient during the sketch.
    saved = {n: (l.lora_A.requires_grad, l.lora_B.requires_grad) for n, l in layers.items()}
    try:
        GN, _ = pass_(right=omega)
        Q = {n: _orth(y) for n, y in GN.items()}  # left range basis (m×k)
        for _ in range(power_iters):
            _, GtQ = pass_(left=Q)
            P = {n: _orth(z) for n, z in GtQ.items()}  # right basis (n×k)
            GN, _ = pass_(right=P)
            Q = {n: _orth(y) for n, y in GN.items()}
        _, GtQ = pass_(left=Q)  # Bᵀ = Gᵀ Q, so G ≈ Q B
    finally:
        for n, l in layers.items():
            l.lora_A.requires_grad_(saved[n][0])
            l.lora_B.requires_grad_(saved[n][1])
    spectra = {}
    for name, layer in layers.items():
        Bt = GtQ[name].double()  # n×k
        if not torch.isfinite(Bt).all():
            raise ValueError(f"LOI: the gradient of layer {name} is not finite; check loss_fn and the batch")
        V, S, Ut = torch.linalg.svd(Bt, full_matrices=False)  # Bᵀ = V S Ũᵀ  =>  G ≈ (Q Ũ) S Vᵀ
        U = Q[name].double() @ Ut.mT
        r = ranks[name]
        a = -1.0 / math.sqrt(r) if alpha is None else float(alpha)
        if a == 0 or not math.isfinite(a):
            raise ValueError(f"alpha must be a finite non-zero number; got {alpha!r}")
        layer.set_start(U[:, :r], a * V[:, r : 2 * r])
        spectra[name] = S[: 2 * r].float()
    logger.info("LOI: initialized %d adapters from %d gradient passes", len(layers), 2 * power_iters + 2)
    return spectra


def _init_loi(model: nn.Module, batch=None, loss_fn=None, alpha=None, power_iters=15, oversample=None, loi_seed=0):
    """``inject_adapters(..., init="loi", batch=..., loss_fn=..., alpha, power_iters, oversample, loi_seed)``."""
    if batch is None or loss_fn is None:
        raise TypeError("init='loi' needs batch=... and loss_fn=callable(model, batch) -> scalar loss")
    loi_init(model, batch, loss_fn, alpha=alpha, power_iters=power_iters, oversample=oversample, seed=loi_seed)


INITIALIZERS["loi"] = _init_loi
