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
    "thin_qr",
    "orthonormal_basis",
    "tangent_gradient",
    "project",
    "project_factored",
    "transport",
    "retract",
    "orthogonalize",
    "truncated_svd_factors",
    "polish_orthonormal",
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


def thin_qr(B: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical thin QR ``B = B_R R`` (R upper triangular, non-negative diagonal).

    B: (..., n, r) of full column rank -> (B_R: (..., n, r), R: (..., r, r)), in
    the working precision. The sign convention makes the factors unique.
    """
    dtype = working_dtype(B)
    Q, R = torch.linalg.qr(_up(B, dtype))
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2), R * signs.unsqueeze(-1)


def orthonormal_basis(B: Tensor) -> Tensor:
    """B_R of :func:`thin_qr`: the canonical orthonormal basis of span(B), (..., n, r)."""
    return thin_qr(B)[0]


def tangent_gradient(A_L: Tensor, B: Tensor, GB: Tensor, GtA_L: Tensor) -> tuple[Tangent, Tensor]:
    """Riemannian gradient from the plain LoRA gradients of one backward pass.

    A_L: (..., m, r), B: (..., n, r) the point; GB = G @ B: (..., m, r) and
    GtA_L = Gᵀ @ A_L: (..., n, r), which autograd leaves in ``lora_A.grad`` and
    ``lora_B.grad`` for the forward ``x (A_L Bᵀ)ᵀ``. With ``B = B_R R`` (thin QR),
    ``G B_R = (G B) R⁻¹`` (a triangular solve; R is diagonal up to rounding when B
    has orthogonal columns, as every retraction leaves it, so the solve is a
    well-conditioned column scaling). Returns (P_X(G) as a Tangent, B_R).
    """
    B_R, R = thin_qr(B)
    dtype = B_R.dtype
    GB_R = torch.linalg.solve_triangular(R, _up(GB, dtype), upper=True, left=False)
    return project(_up(A_L, dtype), B_R, GB_R, _up(GtA_L, dtype)), B_R


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
    the rank-2r matrix ``Z = A_dot B_R_oldᵀ + A_L_old B_dotᵀ``, projected onto the
    tangent space at the new point (A_L, B_R) with r×r products only:
    ``Z B_R = A_dot (B_R_oldᵀ B_R) + A_L_old (B_dotᵀ B_R)``,
    ``Zᵀ A_L = B_R_old (A_dotᵀ A_L) + B_dot (A_L_oldᵀ A_L)``.
    """
    ZB = xi.A_dot @ (B_R_old.mT @ B_R) + A_L_old @ (xi.B_dot.mT @ B_R)
    ZtA = B_R_old @ (xi.A_dot.mT @ A_L) + xi.B_dot @ (A_L_old.mT @ A_L)
    return project(A_L, B_R, ZB, ZtA)


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


def _extend_basis(Q: Tensor, Y: Tensor, passes: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Split Y against an orthonormal Q: ``Y = Q C + Q_y T`` with ``Q_y ⊥ Q``.

    Q: (..., m, r) orthonormal, Y: (..., m, k) -> (Q_y: (..., m, k), C: (..., r, k),
    T: (..., k, k) upper triangular). Gram–Schmidt runs ``passes`` times (two are
    enough when Y lies mostly in span(Q); one suffices when Y is already
    projected, as A_dot is). Cost: one thin QR of an m×k block instead of an
    m×(r+k) one.
    """
    C = torch.zeros(Y.shape[:-2] + (Q.shape[-1], Y.shape[-1]), dtype=Y.dtype, device=Y.device)
    res = Y
    for _ in range(passes):
        Ci = Q.mT @ res
        res = res - Q @ Ci
        C = C + Ci
    Q_y, T = torch.linalg.qr(res)
    return Q_y, C, T


def _svd_in_bases(
    Q_L: tuple[Tensor, Tensor], K_L: Tensor, Q_R: tuple[Tensor, Tensor], K_R: Tensor, rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``(Q_L K_L)(Q_R K_R)ᵀ`` with orthonormal Q_L (..., m, p), Q_R (..., n, q).

    Q_L and Q_R come as pairs of blocks (their concatenation is the basis);
    K_L: (..., p, k), K_R: (..., q, k). Only the p×q core is decomposed.
    Returns (U (..., m, t), S (..., t), V (..., n, t)), t = rank or min(p, q).
    """
    U_c, S, Vh_c = torch.linalg.svd(K_L @ K_R.mT, full_matrices=False)
    t = S.shape[-1] if rank is None else min(rank, S.shape[-1])
    return _apply_split(Q_L, U_c[..., :t]), S[..., :t], _apply_split(Q_R, Vh_c[..., :t, :].mT)


def _apply_split(Qs: tuple[Tensor, Tensor], W: Tensor) -> Tensor:
    """``[Q1, Q2] @ W`` without materializing the concatenation. W: (..., p1 + p2, t)."""
    Q1, Q2 = Qs
    p1 = Q1.shape[-1]
    return Q1 @ W[..., :p1, :] + Q2 @ W[..., p1:, :]


def _tangent_svd(
    A_L: Tensor, B_R: Tensor, A_dot: Tensor, B_right: Tensor, rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``A_dot B_Rᵀ + A_L B_rightᵀ`` (rank ≤ 2r) from r-wide QRs only.

    A_L: (..., m, r) and B_R: (..., n, r) orthonormal; A_dot: (..., m, r) (⊥ A_L up
    to rounding); B_right: (..., n, r). With ``A_dot = A_L C_a + Q_a T_a`` and
    ``B_right = B_R C_b + Q_b T_b``:

        A_dot B_Rᵀ + A_L B_rightᵀ = [A_L, Q_a] [[C_a, I], [T_a, 0]] [[I, C_b], [0, T_b]]ᵀ [B_R, Q_b]ᵀ
    """
    r = A_L.shape[-1]
    Q_a, C_a, T_a = _extend_basis(A_L, A_dot, passes=1)
    Q_b, C_b, T_b = _extend_basis(B_R, B_right, passes=2)
    eye = torch.eye(r, dtype=A_L.dtype, device=A_L.device).expand_as(C_a)
    zero = torch.zeros_like(C_a)
    K_L = torch.cat([torch.cat([C_a, eye], -1), torch.cat([T_a, zero], -1)], -2)  # (2r, 2r)
    K_R = torch.cat([torch.cat([eye, C_b], -1), torch.cat([zero, T_b], -1)], -2)
    return _svd_in_bases((A_L, Q_a), K_L, (B_R, Q_b), K_R, rank)


def polish_orthonormal(Q: Tensor) -> Tensor:
    """One Newton–Schulz step towards orthonormal columns: ``Q (3I − QᵀQ) / 2``.

    Q: (..., m, r) with ‖QᵀQ − I‖ = e small -> error O(e²). Matmuls only; keeps
    A_L orthonormal to rounding over thousands of steps.
    """
    r = Q.shape[-1]
    eye = torch.eye(r, dtype=Q.dtype, device=Q.device)
    return Q @ (1.5 * eye - 0.5 * (Q.mT @ Q))


def retract(
    A_L: Tensor,
    B: Tensor,
    B_R: Tensor,
    direction: Tangent,
    step_size: float | Tensor,
    decay: float | Tensor = 1.0,
    return_basis: bool = False,
) -> tuple[Tensor, ...]:
    """Metric-projection retraction: ``SVD_r(decay·X − step_size·D)`` (DESIGN.md §5).

    A_L: (..., m, r), B: (..., n, r), B_R = orthonormal_basis(B), direction D at X.
    ``decay·X − ηD = [−ηA_dot, A_L] @ [B_R, decay·B − ηB_dot].mT`` has rank ≤ 2r.
    Since A_dot ⊥ A_L and B_R is orthonormal, only the parts of −ηA_dot and of
    ``decay·B − ηB_dot`` outside span(A_L), span(B_R) need a thin QR (r columns
    each); then an SVD of the 2r×2r core keeps the top r. Returns the new
    (A_L: (..., m, r), B: (..., n, r)) with ``B = V diag(S)``; A_L gets one
    Newton–Schulz polish so rounding drift does not accumulate over many steps.
    With ``return_basis=True`` also returns V (..., n, r): the orthonormal basis of
    the new B (equal, up to rounding, to ``orthonormal_basis(B)``, since
    ``B = V diag(S)`` is already a QR with positive diagonal).
    """
    r = A_L.shape[-1]
    dtype = working_dtype(A_L, B)
    A_L, B, B_R = _up(A_L, dtype), _up(B, dtype), _up(B_R, dtype)
    A_dot, B_dot = _up(direction.A_dot, dtype), _up(direction.B_dot, dtype)
    U, S, V = _tangent_svd(A_L, B_R, -step_size * A_dot, torch.add(decay * B, B_dot, alpha=-step_size), rank=r)
    out = (polish_orthonormal(U), V * S.unsqueeze(-2))
    return out + (V,) if return_basis else out


def orthogonalize(xi: Tangent, A_L: Tensor, B_R: Tensor, rtol: float | None = None) -> Tangent:
    """Muon's orthogonalization of a tangent vector, projected back (DESIGN.md §6).

    Writes xi as ``A_dot B_Rᵀ + A_L B_dotᵀ`` (rank ≤ 2r), replaces its nonzero
    singular values by 1 (singular values below ``rtol·σ_max`` count as zero;
    default rtol = 10·2r·eps of the working dtype), and returns ``P_X(Ortho(xi))``
    as a tangent pair. Shapes as in :func:`transport`.
    """
    dtype = working_dtype(A_L, B_R, xi.A_dot, xi.B_dot)
    A_L, B_R = _up(A_L, dtype), _up(B_R, dtype)
    U, S, V = _tangent_svd(A_L, B_R, _up(xi.A_dot, dtype), _up(xi.B_dot, dtype))
    if rtol is None:
        rtol = 10 * 2 * A_L.shape[-1] * torch.finfo(dtype).eps
    keep = (S > rtol * S[..., :1]).to(dtype)  # (..., q)
    return project_factored(A_L, B_R, U * keep.unsqueeze(-2), V)


def tangent_inner(a: Tangent, b: Tangent) -> Tensor:
    """Frobenius inner product of two tangent vectors at the same point: (...,).

    With A_dot ⊥ A_L and B_R orthonormal, ``<ξ, η> = <A_dot_ξ, A_dot_η> + <B_dot_ξ, B_dot_η>``.
    """
    return (a.A_dot * b.A_dot).sum((-2, -1)) + (a.B_dot * b.B_dot).sum((-2, -1))
