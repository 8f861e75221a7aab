"""The fixed-rank adapter layer: a wrapped ``nn.Linear`` plus a point of M_r.

The layer computes ``base(x) + scale · x (X − X0)ᵀ`` with ``X = A_L Bᵀ`` the trainable
point and ``X0 = A0 B0ᵀ`` the frozen start (DESIGN.md §1, §3, §7). The base weight is
never modified (unless merged), so at step 0 the output equals the base model's.

Trainable parameters are the point itself: ``lora_A`` (A_L, m×r, orthonormal
columns) and ``lora_B`` (B, n×r). The forward is a plain rank-2r LoRA
``x [B, B0] [A_L, −A0]ᵀ``, so one backward pass leaves

    lora_A.grad = G @ B          lora_B.grad = Gᵀ @ A_L

with G = ∂L/∂W and no m×n gradient ever formed. Riemannion (optimizer.py) gets the
``G B_R`` of DESIGN.md §3 as ``(G B) R⁻¹`` from the thin QR ``B = B_R R``
(manifold.tangent_gradient). The layer keeps B with orthogonal columns
(``B = V diag(S)``, the form every retraction returns, and the form
:meth:`set_start`/:meth:`set_point` put any factor pair into), so R is diagonal
up to rounding and the solve is a well-conditioned column scaling. This costs the
same as a rank-2r LoRA and needs no probe parameter or per-forward QR.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


__all__ = ["RiemannLinear", "delta_factors", "validate_rank"]


def delta_factors(A_L: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """(up: (m, 2r), down: (n, 2r)) with ``up @ down.T = A_L Bᵀ − A0 B0ᵀ = X − X0``."""
    return torch.cat([A_L, A0], -1), torch.cat([B, -B0], -1)


def validate_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> int:
    """Return ``rank`` or raise a ValueError naming the layer and the allowed range."""
    limit = min(out_features, in_features)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > limit:
        raise ValueError(
            f"rank must be an integer in [1, {limit}] for {name} "
            f"({out_features}×{in_features}); got {rank!r}"
        )
    return rank


class RiemannLinear(nn.Module):
    """Wrap an ``nn.Linear`` with a trainable fixed-rank update (PEFT-style wrapper).

    Args:
        base_layer: the linear layer to adapt; its parameters are frozen.
        rank: r, 1 ≤ r ≤ min(out_features, in_features).
        init_scale: Frobenius norm of X0 relative to ‖W‖ for the default random init.
        generator: optional torch.Generator for the default init.
        name: module path, used in error messages.

    Attributes:
        lora_A (Parameter, m×r, fp32): A_L, orthonormal columns.
        lora_B (Parameter, n×r, fp32): B, so that X = A_L Bᵀ.
        lora_A0, lora_B0 (buffers): frozen factors of X0.
        scale (float): inference strength of the update (keep 1 for training).
    """

    adapter_dtype = torch.float32

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        init_scale: float = 1e-3,
        generator: torch.Generator | None = None,
        name: str = "layer",
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(base_layer).__name__}")
        m, n = base_layer.out_features, base_layer.in_features
        validate_rank(rank, m, n, name)
        self.base_layer = base_layer
        self.rank = rank
        self.scale = 1.0
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(m, rank, dtype=self.adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(n, rank, dtype=self.adapter_dtype, device=device))
        self.register_buffer("lora_A0", torch.empty(m, rank, dtype=self.adapter_dtype, device=device))
        self.register_buffer("lora_B0", torch.empty(n, rank, dtype=self.adapter_dtype, device=device))
        self._merged_backup: Tensor | None = None
        self.reset_random(init_scale, generator)

    # ------------------------------------------------------------------ init
    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @torch.no_grad()
    def reset_random(self, init_scale: float = 1e-3, generator: torch.Generator | None = None):
        """Default init: random orthonormal A_L, small B with ‖X0‖ = init_scale·‖W‖."""
        m, n, r = self.out_features, self.in_features, self.rank
        dev = self.lora_A.device
        A = torch.randn(m, r, generator=generator, dtype=torch.float64).to(dev)
        B = torch.randn(n, r, generator=generator, dtype=torch.float64).to(dev)
        A_L = torch.linalg.qr(A)[0]
        w_norm = float(self.base_layer.weight.detach().float().norm())
        target = init_scale * (w_norm if w_norm > 0 else math.sqrt(m * n))
        B = B * (target / float(B.norm()))
        self.set_start(A_L, B)

    def _canonical(self, A_L: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """Same X = A_L Bᵀ with orthonormal A_L and B = V diag(S) (orthogonal columns).

        A_L: (m, r) with orthonormal columns, B: (n, r) of full column rank.
        """
        m, n, r = self.out_features, self.in_features, self.rank
        if tuple(A_L.shape) != (m, r) or tuple(B.shape) != (n, r):
            raise ValueError(
                f"factors must be A_L ({m}, {r}) and B ({n}, {r}); "
                f"got {tuple(A_L.shape)} and {tuple(B.shape)}"
            )
        Q, T = torch.linalg.qr(A_L.detach().double())  # A_L = Q T, so X = Q (B Tᵀ)ᵀ
        V, S, Wh = torch.linalg.svd(B.detach().double() @ T.T, full_matrices=False)
        return Q @ Wh.T, V * S  # X = (Q W) (V S)ᵀ

    @torch.no_grad()
    def set_start(self, A_L: Tensor, B: Tensor):
        """Set both the point X and the frozen start X0 to ``A_L Bᵀ``.

        A_L: (m, r) with orthonormal columns; B: (n, r) of full column rank. The
        factors are stored in the canonical form of :meth:`_canonical`.
        """
        A_L, B = self._canonical(A_L, B)
        for dst, src in ((self.lora_A, A_L), (self.lora_A0, A_L), (self.lora_B, B), (self.lora_B0, B)):
            dst.copy_(src.to(dst.dtype))

    @torch.no_grad()
    def set_point(self, A_L: Tensor, B: Tensor):
        """Move X to ``A_L Bᵀ`` keeping X0 (canonical form as in :meth:`set_start`)."""
        A_L, B = self._canonical(A_L, B)
        self.lora_A.copy_(A_L.to(self.lora_A.dtype))
        self.lora_B.copy_(B.to(self.lora_B.dtype))

    # -------------------------------------------------------------- accessors
    def factors(self) -> tuple[Tensor, Tensor]:
        """(A_L: (m, r), B: (n, r)) of the current point X = A_L Bᵀ (detached)."""
        return self.lora_A.detach(), self.lora_B.detach()

    def start_factors(self) -> tuple[Tensor, Tensor]:
        """(A0: (m, r), B0: (n, r)) of the frozen start X0."""
        return self.lora_A0, self.lora_B0

    def delta_factors(self) -> tuple[Tensor, Tensor]:
        """Factors (up: (m, 2r), down: (n, 2r)) with ``up @ down.T = X − X0``."""
        return delta_factors(*self.factors(), self.lora_A0, self.lora_B0)

    def delta_weight(self) -> Tensor:
        """The dense update ``X − X0`` (m×n, fp32): exactly what export writes."""
        up, down = self.delta_factors()
        return up @ down.T

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or self.scale == 0:
            return out
        dt = x.dtype if x.dtype.is_floating_point else self.adapter_dtype
        # x [B, B0] [A_L, −A0]ᵀ = x (X − X0)ᵀ; gradients G B into lora_A, Gᵀ A_L into lora_B.
        down = torch.cat([self.lora_B, self.lora_B0], -1).to(dt)
        up = torch.cat([self.lora_A, -self.lora_A0], -1).to(dt)
        delta = (x.to(dt) @ down) @ up.T
        if self.scale != 1:
            delta = delta * self.scale
        return out + delta.to(out.dtype)

    # ----------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self, safe_merge: bool = False):
        """Fuse ``scale·(X − X0)`` into the base weight (computed in fp32)."""
        if self.merged:
            return
        W = self.base_layer.weight
        new = W.float() + self.scale * self.delta_weight().to(W.device)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("merging would produce NaN/Inf weights; adapter is broken")
        self._merged_backup = W.detach().clone()
        W.copy_(new.to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore the exact base weight saved by :meth:`merge`."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._merged_backup)
        self._merged_backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, merged={self.merged}"
