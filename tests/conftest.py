"""Shared fixtures, tolerances and dense reference maths for the tests.

The dense helpers here are the independent oracle: they form m×n matrices and call
torch.linalg.svd, which the library itself never does.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOL64 = dict(rtol=1e-9, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=1e-5)

# (m, n, r) cases: m ≠ n both ways, r = 1 and r = min(m, n) − 1.
SHAPES = [(12, 7, 1), (12, 7, 6), (7, 12, 1), (7, 12, 6), (20, 15, 4)]
SEEDS = [0, 1, 2]


def rand_point(m, n, r, seed=0, dtype=torch.float64):
    """A random rank-r point as (A_L, B) with orthonormal A_L and spread singular values."""
    g = torch.Generator().manual_seed(seed)
    A_L = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    S = torch.linspace(2.0, 0.5, r, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    B = V @ torch.diag(S) @ Q  # not an SVD-aligned B: A_L Bᵀ is a general split
    return A_L.to(dtype), B.to(dtype)


def dense_svd_r(X: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of a dense matrix (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def dense_project(X: torch.Tensor, Z: torch.Tensor, r: int) -> torch.Tensor:
    """Tangent projection P_X(Z) from a dense SVD of X."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    U, V = U[:, :r], Vh[:r].T
    Pu, Pv = U @ U.T, V @ V.T
    return Pu @ Z + Z @ Pv - Pu @ Z @ Pv


def dense_ortho(Z: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Set the nonzero singular values of a dense matrix to one."""
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = S > rtol * S[0]
    return U[:, keep] @ Vh[keep]


def tangent_to_dense(A_L, B_R, A_dot, B_dot):
    return A_dot @ B_R.T + A_L @ B_dot.T


@pytest.fixture
def tiny_mlp():
    def make(dims=(10, 16, 16, 8), seed=0, dtype=torch.float32):
        torch.manual_seed(seed)
        layers = []
        for i in range(len(dims) - 1):
            layers += [torch.nn.Linear(dims[i], dims[i + 1]), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers[:-1]).to(dtype)

    return make
