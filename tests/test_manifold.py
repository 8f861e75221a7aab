"""Manifold maths against pymanopt's FixedRankEmbedded and dense SVD references (float64)."""

import numpy as np
import pytest
import torch
from conftest import SEEDS, SHAPES, TOL64, dense_ortho, dense_project, dense_svd_r, rand_point, tangent_to_dense
from pymanopt.manifolds import FixedRankEmbedded

from riemann_diffusion.manifold import (
    Tangent,
    orthogonalize,
    orthonormal_basis,
    project,
    retract,
    tangent_inner,
    transport,
    truncated_svd_factors,
)


def _pymanopt_point(X: torch.Tensor, r: int):
    U, S, Vh = np.linalg.svd(X.numpy(), full_matrices=False)
    return (U[:, :r], S[:r], Vh[:r])


def _pymanopt_tangent_dense(manifold, point, tv) -> torch.Tensor:
    U, S, V = manifold.embedding(point, tv)
    return torch.from_numpy(U @ S @ V.T)


def _ours_tangent_of_dense(A_L, B_R, Z):
    return project(A_L, B_R, Z @ B_R, Z.T @ A_L)


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_projection_matches_pymanopt(m, n, r, seed):
    A_L, B = rand_point(m, n, r, seed)
    B_R = orthonormal_basis(B)
    X = A_L @ B.T
    Z = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    ours = _ours_tangent_of_dense(A_L, B_R, Z)
    manifold = FixedRankEmbedded(m, n, r)
    point = _pymanopt_point(X, r)
    ref = _pymanopt_tangent_dense(manifold, point, manifold.projection(point, Z.numpy()))
    torch.testing.assert_close(tangent_to_dense(A_L, B_R, *ours), ref, **TOL64)
    # gauge: the A_dot part is orthogonal to A_L
    assert (A_L.T @ ours.A_dot).abs().max() < 1e-12


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_transport_matches_pymanopt(m, n, r, seed):
    A_a, B_a = rand_point(m, n, r, seed)
    A_b, B_b = rand_point(m, n, r, seed + 50)
    Ra, Rb = orthonormal_basis(B_a), orthonormal_basis(B_b)
    Z = torch.randn(m, n, generator=torch.Generator().manual_seed(7 + seed), dtype=torch.float64)
    xi_a = _ours_tangent_of_dense(A_a, Ra, Z)
    ours = transport(A_a, Ra, xi_a, A_b, Rb)
    manifold = FixedRankEmbedded(m, n, r)
    pa, pb = _pymanopt_point(A_a @ B_a.T, r), _pymanopt_point(A_b @ B_b.T, r)
    tv_a = manifold.projection(pa, Z.numpy())
    ref = _pymanopt_tangent_dense(manifold, pb, manifold.transport(pa, pb, tv_a))
    torch.testing.assert_close(tangent_to_dense(A_b, Rb, *ours), ref, **TOL64)


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_retraction_matches_pymanopt_and_dense_svd(m, n, r, seed):
    A_L, B = rand_point(m, n, r, seed)
    B_R = orthonormal_basis(B)
    X = A_L @ B.T
    Z = torch.randn(m, n, generator=torch.Generator().manual_seed(11 + seed), dtype=torch.float64)
    xi = _ours_tangent_of_dense(A_L, B_R, Z)
    eta = 0.3
    A_new, B_new = retract(A_L, B, B_R, xi, eta)
    X_new = A_new @ B_new.T
    dense_xi = tangent_to_dense(A_L, B_R, *xi)
    torch.testing.assert_close(X_new, dense_svd_r(X - eta * dense_xi, r), **TOL64)
    manifold = FixedRankEmbedded(m, n, r)
    point = _pymanopt_point(X, r)
    tv = manifold.projection(point, Z.numpy()) * (-eta)
    u, s, vt = manifold.retraction(point, tv)
    # pymanopt adds np.spacing(1) to every singular value
    torch.testing.assert_close(X_new, torch.from_numpy((u * (s - np.spacing(1))) @ vt), **TOL64)
    assert (A_new.T @ A_new - torch.eye(r, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("m,n", [(6, 9), (9, 6)])
def test_retraction_at_full_rank(m, n):
    """r = min(m, n): one factor's complement is empty; still the metric projection."""
    r = min(m, n)
    A_L, B = rand_point(m, n, r, 6)
    B_R = orthonormal_basis(B)
    Z = torch.randn(m, n, dtype=torch.float64)
    xi = _ours_tangent_of_dense(A_L, B_R, Z)
    A_new, B_new = retract(A_L, B, B_R, xi, 0.1)
    torch.testing.assert_close(A_new @ B_new.T, A_L @ B.T - 0.1 * tangent_to_dense(A_L, B_R, *xi), **TOL64)
    assert (A_new.T @ A_new - torch.eye(r, dtype=torch.float64)).abs().max() < 1e-12


def test_retraction_is_descent_not_ascent():
    """The seed's printed [ηȦ, A_L] is ascent: moving along −grad must lower <G, X>."""
    m, n, r = 15, 10, 3
    A_L, B = rand_point(m, n, r, 3)
    B_R = orthonormal_basis(B)
    G = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grad = _ours_tangent_of_dense(A_L, B_R, G)
    A_new, B_new = retract(A_L, B, B_R, grad, 1e-3)
    assert torch.sum(G * (A_new @ B_new.T - A_L @ B.T)) < 0


def test_retraction_keeps_current_point():
    """v2's Algorithm 4 drops B from the right factor; a zero step must return X."""
    A_L, B = rand_point(9, 8, 2, 4)
    zero = Tangent(torch.zeros_like(A_L), torch.zeros_like(B))
    A_new, B_new = retract(A_L, B, orthonormal_basis(B), zero, 0.5)
    torch.testing.assert_close(A_new @ B_new.T, A_L @ B.T, **TOL64)


def test_weight_decay_scales_point():
    A_L, B = rand_point(9, 8, 2, 5)
    zero = Tangent(torch.zeros_like(A_L), torch.zeros_like(B))
    A_new, B_new = retract(A_L, B, orthonormal_basis(B), zero, 0.1, decay=0.9)
    torch.testing.assert_close(A_new @ B_new.T, 0.9 * A_L @ B.T, **TOL64)


@pytest.mark.parametrize("seed", SEEDS)
def test_retraction_first_order(seed):
    """retr(x, t·u) = x + t·u + O(t²)."""
    m, n, r = 14, 9, 3
    A_L, B = rand_point(m, n, r, seed)
    B_R = orthonormal_basis(B)
    xi = _ours_tangent_of_dense(A_L, B_R, torch.randn(m, n, dtype=torch.float64))
    dense = tangent_to_dense(A_L, B_R, *xi)
    errs = []
    for t in (1e-2, 1e-3):
        A_new, B_new = retract(A_L, B, B_R, xi, -t)
        errs.append(float((A_new @ B_new.T - (A_L @ B.T + t * dense)).norm()))
    assert errs[1] < errs[0] / 50  # quadratic: 100× smaller for 10× smaller t


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_orthogonalize_matches_dense(m, n, r):
    A_L, B = rand_point(m, n, r, 8)
    B_R = orthonormal_basis(B)
    X = A_L @ B.T
    xi = _ours_tangent_of_dense(A_L, B_R, torch.randn(m, n, dtype=torch.float64))
    ours = tangent_to_dense(A_L, B_R, *orthogonalize(xi, A_L, B_R))
    ref = dense_project(X, dense_ortho(tangent_to_dense(A_L, B_R, *xi)), r)
    torch.testing.assert_close(ours, ref, **TOL64)


def test_orthogonalize_ignores_rounding_level_singular_values():
    """A rank-1 tangent vector written with 2r columns must stay rank 1 after Ortho."""
    m, n, r = 10, 9, 3
    A_L, B = rand_point(m, n, r, 9)
    B_R = orthonormal_basis(B)
    u = torch.randn(m, 1, dtype=torch.float64)
    v = torch.randn(n, 1, dtype=torch.float64)
    xi = _ours_tangent_of_dense(A_L, B_R, A_L[:, :1] @ v.T * 0 + (u - A_L @ (A_L.T @ u)) @ (B_R[:, :1]).T)
    out = tangent_to_dense(A_L, B_R, *orthogonalize(xi, A_L, B_R))
    assert torch.linalg.matrix_rank(out, rtol=1e-8) == 1
    torch.testing.assert_close(torch.linalg.svdvals(out)[0], torch.tensor(1.0, dtype=torch.float64), **TOL64)


def test_truncated_svd_factors_equals_dense():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 13, 6, generator=g, dtype=torch.float64)
    R = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    U, S, V = truncated_svd_factors(L, R, rank=4)
    for i in range(3):
        ref = torch.linalg.svdvals(L[i] @ R[i].T)[:4]
        torch.testing.assert_close(S[i], ref, **TOL64)
        torch.testing.assert_close((U[i] * S[i]) @ V[i].T, dense_svd_r(L[i] @ R[i].T, 4), **TOL64)


def test_batched_equals_per_item():
    items = [rand_point(11, 8, 3, s) for s in range(4)]
    A = torch.stack([a for a, _ in items])
    B = torch.stack([b for _, b in items])
    B_R = orthonormal_basis(B)
    Z = torch.randn(4, 11, 8, dtype=torch.float64)
    xi = project(A, B_R, Z @ B_R, Z.mT @ A)
    A_new, B_new = retract(A, B, B_R, xi, 0.2)
    O = orthogonalize(xi, A, B_R)
    for i in range(4):
        Ri = orthonormal_basis(B[i])
        torch.testing.assert_close(Ri, B_R[i], **TOL64)
        xi_i = project(A[i], Ri, Z[i] @ Ri, Z[i].T @ A[i])
        a, b = retract(A[i], B[i], Ri, xi_i, 0.2)
        torch.testing.assert_close(a @ b.T, A_new[i] @ B_new[i].T, **TOL64)
        o = orthogonalize(xi_i, A[i], Ri)
        torch.testing.assert_close(tangent_to_dense(A[i], Ri, *o), tangent_to_dense(A[i], Ri, O.A_dot[i], O.B_dot[i]), **TOL64)


def test_orthonormal_basis_is_canonical():
    _, B = rand_point(10, 8, 3, 1)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    B_R = orthonormal_basis(B)
    R = B_R.T @ B
    assert torch.allclose(R, torch.triu(R), atol=1e-12) and (torch.diagonal(R) > 0).all()
    # same column space for any right factor rotation
    B_R2 = orthonormal_basis(B @ Q)
    torch.testing.assert_close(B_R2 @ B_R2.T, B_R @ B_R.T, **TOL64)


def test_low_precision_inputs_use_float32():
    A_L, B = rand_point(10, 8, 2, 0, dtype=torch.bfloat16)
    assert orthonormal_basis(B).dtype == torch.float32
    xi = Tangent(torch.zeros(10, 2, dtype=torch.bfloat16), torch.zeros(8, 2, dtype=torch.bfloat16))
    A_new, B_new = retract(A_L, B, orthonormal_basis(B), xi, 0.1)
    assert A_new.dtype == torch.float32 and B_new.dtype == torch.float32


def test_tangent_inner_is_frobenius():
    m, n, r = 12, 9, 3
    A_L, B = rand_point(m, n, r, 2)
    B_R = orthonormal_basis(B)
    a = _ours_tangent_of_dense(A_L, B_R, torch.randn(m, n, dtype=torch.float64))
    b = _ours_tangent_of_dense(A_L, B_R, torch.randn(m, n, dtype=torch.float64))
    ref = (tangent_to_dense(A_L, B_R, *a) * tangent_to_dense(A_L, B_R, *b)).sum()
    torch.testing.assert_close(tangent_inner(a, b), ref, **TOL64)
