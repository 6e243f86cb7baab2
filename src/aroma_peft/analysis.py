"""Effective rank (paper Appendix C, eqs. 7-9) of a module's update."""

from __future__ import annotations

import math

import torch


def effective_rank(weight: torch.Tensor) -> float:
    """exp(H(p)) with p_k = sigma_k / sum_k |sigma_k| over the singular values of ``weight`` (eqs. 7-9).

    Terms with p_k = 0 contribute 0 to the entropy (the limit of p log p). A zero matrix has
    effective rank 0.
    """
    if weight.ndim != 2:
        raise ValueError(f"effective_rank needs a 2-D matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        return 0.0
    sigma = torch.linalg.svdvals(weight.detach().to(torch.float64))
    total = sigma.abs().sum()
    if total == 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def module_effective_ranks(model) -> dict[str, float]:
    """Effective rank of s * B A for each AROMA layer of ``model`` (merged and live parts)."""
    return {name: effective_rank(layer.delta_weight()) for name, layer in model.aroma_layers.items()}


def component_cosines(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rank-one components of two runs (paper Appendix E, Fig. 4).

    ``a`` is (p, in) and ``b`` (out, p), as ``merged_A`` and ``merged_B``: component k is
    ``b[:, k] a[k]``. Entry (i, j) is cos(vec(b1_i a1_i), vec(b2_j a2_j)); for outer products it
    factors as cos(b1_i, b2_j) * cos(a1_i, a2_j), so no out x in matrix is formed.
    """
    a1, b1, a2, b2 = (t.detach().to(torch.float64) for t in (a1, b1, a2, b2))
    na1, na2 = a1.norm(dim=1), a2.norm(dim=1)
    nb1, nb2 = b1.norm(dim=0), b2.norm(dim=0)
    cos = (b1.T @ b2) * (a1 @ a2.T) / (torch.outer(nb1 * na1, nb2 * na2))
    return torch.nan_to_num(cos, nan=0.0)  # a zero component is orthogonal to everything
