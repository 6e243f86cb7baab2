"""The fused forward and backward of an AROMA layer's common case, and the predicate that selects it."""

from __future__ import annotations

import torch


def _low_rank_product(left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``bias + left @ right`` for ``left`` (N, r) and ``right`` (r, M), written once.

    For r = 1 an elementwise broadcast (``addcmul``) writes the N x M outer product at memory speed;
    a GEMM with an inner dimension of 1 (``addmm``) was slower on CPU
    (``benchmarks/results/module_step.md``, components table).
    """
    if left.shape[1] == 1:
        return torch.addcmul(bias, left, right) if bias is not None else left * right
    return torch.addmm(bias, left, right) if bias is not None else left @ right


def can_fuse(layer, x: torch.Tensor) -> bool:
    """Whether ``_LiveLinear`` computes exactly what ``layer``'s plain path would for ``x``."""
    base = layer.base_layer
    w, bias = base.weight, base.bias
    return (
        layer.fused
        and layer.active
        and not layer.disabled
        and (layer.fold_merged or not layer.rank)
        and layer.plain_base
        and x.dtype == w.dtype == torch.float32
        and not w.requires_grad
        and (bias is None or not bias.requires_grad)
        and not hasattr(w, "device_mesh")  # FSDP2 DTensor
        and not torch.is_autocast_enabled(x.device.type)
        and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)
    )


def live_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output by ``_LiveLinear`` (merged components folded into its fp32 weight)."""
    base = layer.base_layer
    return _LiveLinear.apply(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, layer.is_conv1d)


class _LiveLinear(torch.autograd.Function):
    """``x W^T + bias + s (x a^T) b^T`` and its gradients in as few passes over memory as possible.

    Used for the common case: an fp32 base layer (merged components already folded into ``W``)
    whose weight and bias are frozen. Compared with the plain autograd path (which writes the
    ``N x out`` outer product, scales it, and adds it to the base output; then, backward, writes
    the ``N x in`` rank-r input gradient and adds it to the base's):

    - forward: the rank-r term is written once, as the GEMM's accumulator (``bias + (s x a^T) b^T``
      by ``_low_rank_product``, in place of the bias broadcast ``F.linear`` does anyway), then
      ``out += x W^T`` in place;
    - backward: the rank-r input gradient ``(s g b) a`` is written once and ``dx += g W`` is
      accumulated into it in place; the factor gradients are two thin products.

    ``W`` is ``(out, in)`` for ``nn.Linear`` and ``(in, out)`` for GPT-2's ``Conv1D``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, conv1d: bool):
        in_features = a.shape[1]
        x2 = x.reshape(-1, in_features)
        us = (x2 @ a.t()) * scaling  # (N, r): the only new activation kept for the backward pass
        out = _low_rank_product(us, b.t(), bias)
        out.addmm_(x2, weight if conv1d else weight.t())
        ctx.save_for_backward(x, weight, a, b, us)
        ctx.scaling, ctx.conv1d = scaling, conv1d
        return out.view(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, a, b, us = ctx.saved_tensors
        g2 = grad_out.reshape(-1, b.shape[0])
        vs = (g2 @ b) * ctx.scaling  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _low_rank_product(vs, a)
            grad_x.addmm_(g2, weight.t() if ctx.conv1d else weight)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = vs.t() @ x.reshape(-1, a.shape[1])
        if ctx.needs_input_grad[4]:
            grad_b = g2.t() @ us
        return grad_x, None, None, grad_a, grad_b, None, None
