"""Geometry of the manifold of fixed-rank matrices, written on thin factors.

Storage contract (DESIGN.md §1, nn.Linear convention, m = out, n = in):

* a point ``X = A_L @ B.mT`` with ``A_L: (..., m, r)`` orthonormal columns and
  ``B: (..., n, r)``; ``B_R = orthonormal_basis(B)`` is the canonical (positive
  diagonal) thin-QR basis of ``B``'s column space;
* a tangent vector at X is the pair ``(A_dot: (..., m, r), B_dot: (..., n, r))``
  meaning ``xi = A_dot @ B_R.mT + A_L @ B_dot.mT`` with the gauge
  ``A_L.mT @ A_dot = 0``.

No function here ever forms an m×n matrix. Every function broadcasts over leading
batch dimensions, so layers of the same shape share one batched decomposition.
QR and SVD run in float32 (float64 when given float64), whatever the input dtype;
results come back in that working precision and callers cast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Tangent",
    "working_dtype",
    "orthonormal_basis",
    "project",
    "project_factored",
    "transport",
    "retract",
    "orthogonalize",
    "truncated_svd_factors",
    "tangent_inner",
]


class Tangent(NamedTuple):
    """A tangent vector ``A_dot @ B_R.mT + A_L @ B_dot.mT`` at a point (A_L, B)."""

    A_dot: Tensor  # (..., m, r), A_L.mT @ A_dot = 0
    B_dot: Tensor  # (..., n, r)


def working_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never bf16/fp16 for QR/SVD)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _up(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def orthonormal_basis(B: Tensor) -> Tensor:
    """Canonical orthonormal basis of the column space of ``B``.

    B: (..., n, r) of full column rank -> B_R: (..., n, r) with ``B_R.mT @ B_R = I``
    and ``B = B_R @ R`` for an upper triangular R with a non-negative diagonal.
    The sign convention makes B_R unique, so the adapter layer and the optimizer
    compute the same basis independently (batched or not).
    """
    dtype = working_dtype(B)
    Q, R = torch.linalg.qr(_up(B, dtype))
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


def project_factored(A_L: Tensor, B_R: Tensor, L: Tensor, R: Tensor) -> Tangent:
    """Project the low-rank ambient matrix ``Z = L @ R.mT`` onto the tangent space.

    A_L: (..., m, r), B_R: (..., n, r), L: (..., m, k), R: (..., n, k).
    Returns (A_dot, B_dot) with ``A_dot = (I - A_L A_Lᵀ) Z B_R`` (m, r) and
    ``B_dot = Zᵀ A_L`` (n, r), using only (k × r) products.
    """
    ZB = L @ (R.mT @ B_R)  # (m, r)
    A_dot = ZB - A_L @ (A_L.mT @ ZB)
    B_dot = R @ (L.mT @ A_L)  # (n, r)
    return Tangent(A_dot, B_dot)


def project(A_L: Tensor, B_R: Tensor, ZB_R: Tensor, ZtA_L: Tensor) -> Tangent:
    """Riemannian gradient from the two products the adapter's backward pass gives.

    ZB_R = Z @ B_R: (..., m, r) and ZtA_L = Z.mT @ A_L: (..., n, r) for an ambient
    Z (the Euclidean gradient G). Returns ``P_X(Z)`` as (A_dot, B_dot):
    ``A_dot = (I - A_L A_Lᵀ) Z B_R``, ``B_dot = Zᵀ A_L`` (DESIGN.md §2-3).
    """
    A_dot = ZB_R - A_L @ (A_L.mT @ ZB_R)
    return Tangent(A_dot, ZtA_L)


def transport(
    A_L_old: Tensor, B_R_old: Tensor, xi: Tangent, A_L: Tensor, B_R: Tensor
) -> Tangent:
    """Vector transport by re-projection (DESIGN.md §4).

    xi lives at the old point (A_L_old: (..., m, r), B_R_old: (..., n, r)); it is
    written as the rank-2r matrix ``[A_dot, A_L_old] @ [B_R_old, B_dot].mT`` and
    projected onto the tangent space at the new point (A_L, B_R).
    """
    L = torch.cat([xi.A_dot, A_L_old], dim=-1)
    R = torch.cat([B_R_old, xi.B_dot], dim=-1)
    return project_factored(A_L, B_R, L, R)


def truncated_svd_factors(L: Tensor, R: Tensor, rank: int | None = None):
    """Thin SVD of ``L @ R.mT`` from its factors, without forming it.

    L: (..., m, k), R: (..., n, k). Returns (U: (..., m, q), S: (..., q),
    V: (..., n, q)) with ``L Rᵀ ≈ U diag(S) Vᵀ`` and q = min(rank, m, n, k)
    (all available singular triplets when rank is None), S descending.
    Cost: QR of both factors plus an SVD of a k×k core.
    """
    dtype = working_dtype(L, R)
    Q_L, T_L = torch.linalg.qr(_up(L, dtype))
    Q_R, T_R = torch.linalg.qr(_up(R, dtype))
    U_c, S, Vh_c = torch.linalg.svd(T_L @ T_R.mT, full_matrices=False)
    q = S.shape[-1] if rank is None else min(rank, S.shape[-1])
    return Q_L @ U_c[..., :q], S[..., :q], Q_R @ Vh_c[..., :q, :].mT


def retract(
    A_L: Tensor,
    B: Tensor,
    B_R: Tensor,
    direction: Tangent,
    step_size: float | Tensor,
    decay: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """Metric-projection retraction: ``SVD_r(decay·X − step_size·D)`` (DESIGN.md §5).

    A_L: (..., m, r), B: (..., n, r), B_R = orthonormal_basis(B), direction D at X.
    ``decay·X − ηD = [−ηA_dot, A_L] @ [B_R, decay·B − ηB_dot].mT`` has rank ≤ 2r;
    its rank-r truncated SVD comes from a QR of each 2r-wide factor and an SVD of
    the 2r×2r core. Returns the new (A_L: (..., m, r), B: (..., n, r)) with
    ``B = V diag(S)``. Both factors are re-orthonormalized from scratch, so
    rounding drift in A_L does not accumulate over many steps.
    """
    r = A_L.shape[-1]
    dtype = working_dtype(A_L, B)
    A_L, B, B_R = _up(A_L, dtype), _up(B, dtype), _up(B_R, dtype)
    A_dot, B_dot = _up(direction.A_dot, dtype), _up(direction.B_dot, dtype)
    left = torch.cat([-step_size * A_dot, A_L], dim=-1)
    right = torch.cat([B_R, decay * B - step_size * B_dot], dim=-1)
    U, S, V = truncated_svd_factors(left, right, rank=r)
    return U, V * S.unsqueeze(-2)


def orthogonalize(xi: Tangent, A_L: Tensor, B_R: Tensor, rtol: float | None = None) -> Tangent:
    """Muon's orthogonalization of a tangent vector, projected back (DESIGN.md §6).

    Writes xi as ``[A_dot, A_L] @ [B_R, B_dot].mT`` (rank ≤ 2r), replaces its
    nonzero singular values by 1 (singular values below ``rtol·σ_max`` count as
    zero; default rtol = 2r·eps of the working dtype ×10), and returns
    ``P_X(Ortho(xi))`` as a tangent pair. Shapes as in :func:`transport`.
    """
    L = torch.cat([xi.A_dot, A_L], dim=-1)
    R = torch.cat([B_R, xi.B_dot], dim=-1)
    U, S, V = truncated_svd_factors(L, R)
    if rtol is None:
        rtol = 10 * L.shape[-1] * torch.finfo(S.dtype).eps
    keep = (S > rtol * S[..., :1]).to(S.dtype)  # (..., q)
    return project_factored(_up(A_L, S.dtype), _up(B_R, S.dtype), U * keep.unsqueeze(-2), V)


def tangent_inner(a: Tangent, b: Tangent) -> Tensor:
    """Frobenius inner product of two tangent vectors at the same point: (...,).

    With A_dot ⊥ A_L and B_R orthonormal, ``<ξ, η> = <A_dot_ξ, A_dot_η> + <B_dot_ξ, B_dot_η>``.
    """
    return (a.A_dot * b.A_dot).sum((-2, -1)) + (a.B_dot * b.B_dot).sum((-2, -1))
