"""The Kalman filter arithmetic of `focaltrack.models.tracker`, batched over a stack of
tracks: H = [I₃ 0] (position measured), R diagonal and given per measurement."""

from __future__ import annotations

import numpy as np

__all__ = ["innovation_cov", "inv_sym3", "kf_update"]


def innovation_cov(p: np.ndarray, rv: np.ndarray) -> np.ndarray:
    """S = H P Hᵀ + R for a stack of covariances and the diagonals of their R, (n, 3, 3)."""
    s = p[:, :3, :3].copy()
    s[:, [0, 1, 2], [0, 1, 2]] += rv
    return s


def inv_sym3(s: np.ndarray) -> np.ndarray:
    """Inverses of a stack of symmetric positive-definite 3×3 matrices (cofactors)."""
    a, b, c = s[:, 0, 0], s[:, 0, 1], s[:, 0, 2]
    d, e, f = s[:, 1, 1], s[:, 1, 2], s[:, 2, 2]
    c00 = d * f - e * e
    c01 = c * e - b * f
    c02 = b * e - c * d
    c11 = a * f - c * c
    c12 = b * c - a * e
    c22 = a * d - b * b
    det = a * c00 + b * c01 + c * c02
    if np.any(~(det > 0)):
        raise FloatingPointError("innovation covariance is not positive definite")
    out = np.empty_like(s)
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = c00, c01, c02
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = c01, c11, c12
    out[:, 2, 0], out[:, 2, 1], out[:, 2, 2] = c02, c12, c22
    out /= det[:, None, None]
    return out


def kf_update(
    x: np.ndarray, p: np.ndarray, z: np.ndarray, rv: np.ndarray, sinv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Batched `filterpy` update with H = [I₃ 0]: K = P Hᵀ S⁻¹, Joseph-form covariance
    P' = (I − KH) P (I − KH)ᵀ + K R Kᵀ, symmetrised; ``rv``: (n, 3) the diagonal of each R."""
    k = p[:, :, :3] @ sinv  # (n, d, 3)
    y = z - x[:, :3]
    x_new = x + (k @ y[:, :, None])[:, :, 0]
    kt = k.transpose(0, 2, 1).copy()
    ap = p - k @ p[:, :3, :]  # (I − KH) P
    # (I − KH) P (I − KH)ᵀ = AP − AP Hᵀ Kᵀ;  K R Kᵀ with R diagonal
    p_new = ap - ap[:, :, :3] @ kt + (k * rv[:, None, :]) @ kt
    p_new += p_new.transpose(0, 2, 1)
    p_new *= 0.5
    return x_new, p_new
