"""Riemannion: Riemannian momentum on the manifold of fixed-rank matrices.

A ``torch.optim.Optimizer`` over the (A_L, B) pairs that ``adapter_parameters(model)``
returns. After ``loss.backward()`` each pair holds ``A.grad = G B`` and
``B.grad = Gᵀ A_L`` (see layer.py); one step

1. turns them into the Riemannian gradient (``G B_R = (G B) R⁻¹``, DESIGN.md §2-3),
2. blends it with the momentum buffer (already transported to this point),
3. retracts ``(1 − ηγ)X − ηD`` by a rank-r truncated SVD from thin factors (§5),
4. transports the buffer to the new point (§4).

Rules (DESIGN.md §6): ``"heavy_ball"`` (default) ``M = βM + (1−β)g, D = M`` and
``"muon"`` ``M = βM + g, D = P_X(Ortho(M))``. The maths lives in the functional
:func:`riemannion_update`; the class gathers tensors, buckets same-shape layers
into one batched QR/SVD (``batched=True``) and keeps per-parameter state.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from .manifold import Tangent, orthogonalize, retract, tangent_gradient, transport, working_dtype

__all__ = ["Riemannion", "riemannion_update", "RULES"]

RULES = ("heavy_ball", "muon")


def riemannion_update(
    A_L: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    mom_A: Tensor,
    mom_B: Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    rule: str,
    maximize: bool = False,
    ortho_rtol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Riemannion step on a point or a batch of same-shape points.

    A_L: (..., m, r) orthonormal, B: (..., n, r); grad_A = G B: (..., m, r) and
    grad_B = Gᵀ A_L: (..., n, r), the plain LoRA gradients; mom_A, mom_B: the
    momentum tangent pair at this point. Returns (A_L', B', mom_A', mom_B') in the
    working precision (float32, or float64 for float64 input), the momentum
    transported to the new point.
    """
    dtype = working_dtype(A_L, B)
    A_L, B = A_L.to(dtype), B.to(dtype)
    g, B_R = tangent_gradient(A_L, B, grad_A, grad_B)
    if maximize:
        g = Tangent(-g.A_dot, -g.B_dot)
    mom = Tangent(mom_A.to(dtype), mom_B.to(dtype))
    if rule == "heavy_ball":
        M = Tangent(torch.lerp(g.A_dot, mom.A_dot, momentum), torch.lerp(g.B_dot, mom.B_dot, momentum))
        D = M
    elif rule == "muon":
        M = Tangent(torch.add(g.A_dot, mom.A_dot, alpha=momentum), torch.add(g.B_dot, mom.B_dot, alpha=momentum))
        D = orthogonalize(M, A_L, B_R, rtol=ortho_rtol)
    else:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    A_new, B_new, B_R_new = retract(A_L, B, B_R, D, lr, decay=1.0 - lr * weight_decay, return_basis=True)
    if momentum == 0:
        return A_new, B_new, torch.zeros_like(mom.A_dot), torch.zeros_like(mom.B_dot)
    M_new = transport(A_L, B_R, M, A_new, B_R_new)
    return A_new, B_new, M_new.A_dot, M_new.B_dot


class Riemannion(Optimizer):
    """Riemannian momentum optimizer for fixed-rank adapters.

    Args:
        params: ``adapter_parameters(model)`` — tensors in (A_L, B) pairs — or a
            list of param-group dicts whose ``"params"`` are such pairs.
        lr: step size η (> 0).
        momentum: β in [0, 1).
        weight_decay: decoupled decay γ ≥ 0 (``X ← (1 − ηγ)X`` before retraction).
        rule: ``"heavy_ball"`` (default) or ``"muon"``.
        batched: share one QR/SVD among same-shape layers (same result as the
            per-layer path, fewer kernel launches).
        maximize: ascend instead of descend.
        ortho_rtol: relative cut-off under which the Muon rule treats a singular
            value as zero (default: 10·2r·eps).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        rule: str = "heavy_ball",
        batched: bool = True,
        maximize: bool = False,
        ortho_rtol: float | None = None,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, rule=rule,
            batched=batched, maximize=maximize, ortho_rtol=ortho_rtol,
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict) -> None:
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        if not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number > 0)")
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid momentum value: {beta!r} (must be in [0, 1))")
        if not isinstance(wd, (int, float)) or not wd >= 0.0 or wd == float("inf"):
            raise ValueError(f"Invalid weight_decay value: {wd!r} (must be finite and >= 0)")
        if group["rule"] not in RULES:
            raise ValueError(f"Invalid rule: {group['rule']!r} (must be one of {RULES})")
        if group.get("ortho_rtol") is not None and not 0 < group["ortho_rtol"] < 1:
            raise ValueError(f"Invalid ortho_rtol: {group['ortho_rtol']!r} (must be in (0, 1))")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group)
        params = group["params"]
        if len(params) % 2:
            raise ValueError(
                f"Riemannion needs (A_L, B) pairs as returned by adapter_parameters(model); "
                f"got an odd number of tensors ({len(params)})"
            )
        for i in range(0, len(params), 2):
            self._check_pair(params[i], params[i + 1], i)

    @staticmethod
    def _check_pair(A: Tensor, B: Tensor, i: int) -> None:
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
            raise ValueError(
                f"parameters {i} and {i + 1} are not an (A_L: m×r, B: n×r) pair: shapes "
                f"{tuple(A.shape)} and {tuple(B.shape)}; pass adapter_parameters(model)"
            )
        for t, k in ((A, i), (B, i + 1)):
            if t.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"parameter {k} is {t.dtype}; Riemannion keeps the adapter factors in float32 (or float64). "
                    f"Cast the base model to bf16/fp16 before inject_adapters, or call .float() on the adapters"
                )
        (m, r), n = A.shape, B.shape[0]
        if r < 1 or r > min(m, n):
            raise ValueError(f"Invalid rank {r} for parameters {i}/{i + 1}: must be in [1, min(m, n) = {min(m, n)}]")
        with torch.no_grad():
            A32 = A.detach().to(working_dtype(A))
            err = (A32.T @ A32 - torch.eye(r, dtype=A32.dtype, device=A32.device)).abs().max()
        if err > 1e-3:
            raise ValueError(
                f"parameter {i} does not have orthonormal columns (max |A_LᵀA_L − I| = {float(err):.2e}); "
                f"Riemannion needs (A_L, B) pairs in the order adapter_parameters(model) returns"
            )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("batched", True), ("maximize", False), ("ortho_rtol", None), ("rule", "heavy_ball")):
                group.setdefault(key, value)

    def _init_group(self, group) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        params = group["params"]
        for i in range(0, len(params), 2):
            A, B = params[i], params[i + 1]
            if A.grad is None and B.grad is None:
                continue
            if A.grad is None or B.grad is None:
                raise RuntimeError(f"parameters {i}/{i + 1}: only one of the pair has a gradient")
            if A.grad.is_sparse or B.grad.is_sparse:
                raise RuntimeError("Riemannion does not support sparse gradients")
            for p in (A, B):
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0)
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            pairs.append((A, B))
        return pairs

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            pairs = self._init_group(group)
            if not pairs:
                continue
            hyper = dict(
                lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                rule=group["rule"], maximize=group["maximize"], ortho_rtol=group["ortho_rtol"],
            )
            if group["batched"]:
                buckets: dict[tuple, list] = defaultdict(list)
                for A, B in pairs:
                    buckets[(tuple(A.shape), tuple(B.shape), A.device, A.dtype)].append((A, B))
                for bucket in buckets.values():
                    self._update(bucket, hyper, stack=len(bucket) > 1)
            else:
                for pair in pairs:
                    self._update([pair], hyper, stack=False)
        return loss

    def _update(self, pairs: list[tuple[Tensor, Tensor]], hyper: dict, stack: bool) -> None:
        As = [A for A, _ in pairs]
        Bs = [B for _, B in pairs]

        def gather(tensors):
            return torch.stack(tensors) if stack else tensors[0]

        out = riemannion_update(
            gather(As), gather(Bs),
            gather([A.grad for A in As]), gather([B.grad for B in Bs]),
            gather([self.state[A]["momentum_buffer"] for A in As]),
            gather([self.state[B]["momentum_buffer"] for B in Bs]),
            **hyper,
        )
        targets = (As, Bs, [self.state[A]["momentum_buffer"] for A in As], [self.state[B]["momentum_buffer"] for B in Bs])
        for dsts, src in zip(targets, out):
            srcs = src.unbind(0) if stack else (src,)
            for dst, s in zip(dsts, srcs):
                dst.copy_(s)
        for A, B in pairs:
            self.state[A]["step"] += 1
            self.state[B]["step"] += 1
