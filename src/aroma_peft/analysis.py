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
