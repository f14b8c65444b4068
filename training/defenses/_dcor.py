"""Distance correlation (Székely, Rizzo & Bakirov 2007) of two batches, differentiable.

The empirical (V-statistic) form NoPeek (Vepakomma et al. 2020) minimizes, per batch of n:

    a_ij = |x_i - x_j|, b_ij = |z_i - z_j|        (Euclidean, on the flattened samples)
    A = a double-centred (a_ij - row mean - column mean + grand mean), B likewise
    dCov^2(x, z) = mean(A * B),  dVar^2(x) = mean(A * A),  dVar^2(z) = mean(B * B)
    dCor(x, z) = sqrt(dCov^2 / sqrt(dVar^2(x) * dVar^2(z)))        in [0, 1]

dCor is 0 only for independent variables (in the population limit) and 1 for z = a x + b (any
scale a != 0 times an orthogonal map). The batch estimate is biased upwards: independent samples
of n = 64 give about 0.2-0.4 depending on the dimensions. Cost O(n^2 (d_x + d_z)).
"""
from __future__ import annotations

import torch

__all__ = ["distance_correlation"]

EPS = 1e-7  # inside the square roots, as in the CEM reference code (research/algorithms.md 5.6)


def _centred_distances(v: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, n) double-centred Euclidean distance matrix of the flattened rows."""
    flat = v.reshape(v.shape[0], -1).float()
    flat = flat - flat.mean(0, keepdim=True)  # smaller norms: less cancellation in the Gram form
    norms = flat.pow(2).sum(1)
    sq = (norms.unsqueeze(1) + norms.unsqueeze(0) - 2.0 * flat @ flat.T).clamp_min(0.0)  # O(n^2) memory
    d = torch.sqrt(sq + EPS)  # finite gradient on the diagonal, where the distance is 0
    d = d - torch.diagonal(d).diag_embed()  # exact zeros on the diagonal, gradient kept finite
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x: (n, ...) and z: (n, ...) float, same n >= 2 -> scalar tensor in [0, 1], differentiable in both."""
    if x.shape[0] != z.shape[0] or x.shape[0] < 2:
        raise ValueError(f"distance_correlation needs two batches of the same size >= 2, "
                         f"got {x.shape[0]} and {z.shape[0]} samples")
    a, b = _centred_distances(x), _centred_distances(z)
    dcov2 = (a * b).mean()
    dvar2 = ((a * a).mean() * (b * b).mean()).clamp_min(1e-30)  # 0 for a constant batch: keep grads finite
    return torch.sqrt(dcov2.clamp_min(0.0) / (torch.sqrt(dvar2) + EPS) + EPS).clamp(max=1.0)
