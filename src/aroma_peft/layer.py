"""AromaLinear: a frozen linear plus merged rank-r components plus one live rank-r component."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .dtensor import copy_full_, full_tensor, like
from .fused import can_fuse, live_linear
from .seeds import derived_seed

try:  # GPT-2 style Conv1D: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

SUPPORTED_BASE_LAYERS = (nn.Linear,) + ((Conv1D,) if Conv1D else ())
OFFSET_STATE = ("offset_A", "offset_B", "merged_count")  # the buffers reinit="offset" added to a layer's state


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (its weight is packed NF4/FP4 bytes, dequantized to compute)."""
    bnb = sys.modules.get("bitsandbytes")  # a module cannot be one unless bitsandbytes is imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def unsupported_base_layer(module: nn.Module) -> str | None:
    """Why ``module`` cannot be an AROMA base layer, or None when it can.

    An ``nn.Linear`` subclass that computes its own ``forward`` (quantized layers: bitsandbytes,
    GPTQ, ...) may keep a packed weight of another shape; reading it as ``(out, in)`` would build
    factors of the wrong shape, so such a layer is refused, except bitsandbytes' 4-bit ``Linear4bit``
    (QLoRA style: eq. (6) on the dequantized weight, merged components kept beside it).
    """
    if not isinstance(module, SUPPORTED_BASE_LAYERS):
        return f"a {type(module).__name__}; AROMA adapts nn.Linear and transformers Conv1D only"
    if type(module) in SUPPORTED_BASE_LAYERS or type(module).forward is nn.Linear.forward or is_4bit(module):
        return None
    return (f"a {type(module).__name__}, a subclass of nn.Linear with its own forward "
            "(a quantized or otherwise packed weight); AROMA adapts plain nn.Linear and transformers Conv1D "
            "layers, and bitsandbytes' 4-bit Linear4bit: leave it out with exclude_modules, or load the model "
            "unquantized or in 4 bits")


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer (a packed weight's shape is not them)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: (in, out)


def kaiming_draw(shape: tuple[int, int], seed: int, index: int, component: int, init_scale: float = 1.0) -> torch.Tensor:
    """The ``a`` that component ``component`` (0 for the first) of module ``index`` starts from under
    ``reinit="kaiming"``: Kaiming uniform (as PEFT's LoRA A) times ``init_scale``, float32 on the CPU,
    seeded by (seed, module index, component), so the same on every process and recomputable from a
    saved adapter (``benchmarks/component_norms.py`` measures how far each ``a`` turned from it)."""
    g = torch.Generator().manual_seed(derived_seed(seed, index, component, 0))
    a = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return a.mul_(init_scale)  # exact for the default 1.0


class AromaLinear(nn.Module):
    """``W0 x + bias + s (B_{p-1} A_{p-1}) x + s (b_p a_p) x`` with ``s = alpha / r`` (paper eq. 4).

    The live factors ``lora_A`` (r x in) and ``lora_B`` (out x r) are the only parameters this
    layer adds; they are created once and re-initialized in place at every Merge & Reinit, so
    optimizers, DDP and checkpoints keep the same Parameter objects.

    Merged components are kept exactly, in fp32, in the buffers ``merged_A`` (k x in) and
    ``merged_B`` (out x k). When the base weight is fp32 they are also folded into it at merge
    time, so they cost nothing per step; a bf16/fp16 base weight is never modified (a small
    update would be rounded away) and the merged factors are applied as a side path instead.

    With ``reinit="offset"`` the live factors restart at ``(b0, a0) != 0`` and the merged update
    holds the offset term ``-s b0 a0`` (``reinit_offset``), so the live component's contribution is
    ``s (b a - b0 a0)``; ``offset_B`` (out x r) and ``offset_A`` (r x in) keep ``(b0, a0)``, zeros
    in every other mode.

    Example:
        >>> layer = AromaLinear(nn.Linear(16, 8), r=1, alpha=4.0, seed=0)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, seed: int = 0, index: int = 0,
                 init_scale: float = 1.0):
        super().__init__()
        why = unsupported_base_layer(base_layer)
        if why is not None:
            raise TypeError(f"AromaLinear cannot wrap this layer: it is {why}")
        self.base_layer = base_layer
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        self.quantized = is_4bit(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = base_features(base_layer)
        self.r = r
        self.scaling = alpha / r
        self.seed = seed
        self.index = index
        self.init_scale = init_scale  # every new a is the Kaiming draw times this (AromaConfig.init_scale)
        self.active = True  # False once converged (or stopped at T): the live factors are frozen and unused
        self.grad_sketch = None  # a GradientSketch unless AromaConfig.reinit == "kaiming" (the controller sets it)
        self.disabled = False  # True inside AromaModel.disable_adapter(): the base layer alone (the reference output)
        self.plain_base = type(base_layer) in SUPPORTED_BASE_LAYERS  # not a subclass (a quantized layer subclasses nn.Linear)
        dev = w.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        self.register_buffer("merged_A", torch.zeros(0, self.in_features, device=dev, dtype=torch.float32))
        self.register_buffer("merged_B", torch.zeros(self.out_features, 0, device=dev, dtype=torch.float32))
        self.register_buffer("offset_A", torch.zeros(r, self.in_features, device=dev, dtype=torch.float32))
        self.register_buffer("offset_B", torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        # Trained components merged so far: not rank // r once offset terms are merged too.
        self.register_buffer("merged_count", torch.zeros((), device=dev, dtype=torch.int64))
        self.reinit_live()

    # ---------------------------------------------------------------- state
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: models read ``.weight.dtype`` of their linears (T5's feed-forward does)."""
        return self.base_layer.weight

    @property
    def fold_merged(self) -> bool:
        """Whether the merged components are folded into the base weight: exactly when it is fp32."""
        return self.base_layer.weight.dtype == torch.float32

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.cuda()``...: the base layer follows; the factors and the
        merged components follow the device only and stay float32. Components folded into an fp32
        weight are taken out before it is cast to another dtype (a bf16 weight would round a
        small update away) and folded in again when it comes back to fp32."""
        if self.fold_merged and self.rank:
            w = self.base_layer.weight
            if fn(torch.empty(0, dtype=w.dtype, device=w.device)).dtype != torch.float32:
                self.original_base_layer()
        was_folded = self.fold_merged

        def factors(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if out.is_floating_point() and out.dtype != t.dtype else out

        if recurse:
            self.base_layer._apply(fn)
        super()._apply(factors, recurse=False)
        if self.fold_merged and not was_folded and self.rank:
            with torch.no_grad():
                w = self.base_layer.weight
                w.add_(like(w, self._delta_in_weight_layout(self.merged_B, self.merged_A)), alpha=self.scaling)
        return self

    @property
    def num_merged(self) -> int:
        """Number of trained rank-r components merged (p - 1 while training); seeds each re-init.

        The offset terms of ``reinit="offset"`` are not counted: they are not trained components."""
        return int(self.merged_count)

    @property
    def rank(self) -> int:
        """Rank of the merged update, the rows of ``merged_A``: what export and the figures report.

        With ``reinit="offset"`` it counts the offset terms too (up to 2 r per merge), exactly the
        rank of the LoRA adapter ``export_lora`` writes."""
        return self.merged_A.shape[0]

    @property
    def has_offset(self) -> bool:
        """Whether the live component started at an offset ``(b0, a0)`` (``reinit="offset"``); a host sync."""
        return bool(self.offset_A.any())

    def set_active(self, active: bool) -> None:
        self.active = active
        self.lora_A.requires_grad_(active)
        self.lora_B.requires_grad_(active)
        if not active:
            self.lora_A.grad = None
            self.lora_B.grad = None

    # ---------------------------------------------------------------- forward
    # The fused path (``fused.py``) is taken when it computes exactly what the plain path does;
    # set ``fused = False`` on a layer (or the class) to force the plain path.
    fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (4): ``W0 x + bias + s (B_{p-1} A_{p-1}) x + s (b_p a_p) x``; x (..., in) -> (..., out).

        With ``disabled`` set (``AromaModel.disable_adapter()``), the base layer's own ``W0 x + bias``.
        """
        if can_fuse(self, x):
            return self._sketched(x, live_linear(self, x))
        out = self.base_layer(x)  # W0 x + bias, plus s B_{p-1} A_{p-1} x when the merged components are folded in
        if self.disabled:
            if self.rank and self.fold_merged:
                out = out - self._merged_term(x, out.dtype)
            return out
        if self.rank and not self.fold_merged:
            out = out + self._merged_term(x, out.dtype)
        if self.active:
            out = out + self.scaling * F.linear(F.linear(x.to(torch.float32), self.lora_A), self.lora_B).to(out.dtype)
        return self._sketched(x, out)

    def _sketched(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """With a ``grad_sketch`` (``reinit="gradient"``), the backward pass adds ``dL/dW = D^T X`` to it."""
        sketch = self.grad_sketch
        if sketch is not None and self.active and out.requires_grad:
            saved = x.detach()
            out.register_hook(lambda grad: sketch.add(saved, grad))
        return out

    def _merged_term(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x.to(torch.float32), self.merged_A), self.merged_B).to(dtype)

    # ---------------------------------------------------------------- the quantities of eqs. (5) and (6)
    def live_norm(self) -> torch.Tensor:
        """||b a - b0 a0||_F, the live component's contribution (over s), from r x r Gram matrices:
        no out x in product (eqs. 5 and 6). With no offset (b0 = a0 = 0), ||b a||_F.

        Written ``db a + b0 da`` (``db = b - b0``, ``da = a - a0``) and expanded by blocks: small
        near the offset without cancelling two large squares, and bitwise sqrt(<b^T b, a a^T>)
        when the offset is zero (the last two blocks are exact zeros)."""
        a, b = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
        a0, b0 = self.offset_A, self.offset_B
        db, da = b - b0, a - a0
        squared = (torch.sum((db.T @ db) * (a @ a.T)) + 2 * torch.sum((db.T @ b0) * (a @ da.T))
                   + torch.sum((b0.T @ b0) * (da @ da.T)))
        return squared.clamp_min(0).sqrt()

    def _delta_in_weight_layout(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        delta = b @ a  # (out, in)
        return delta.T if self.is_conv1d else delta

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32, in its layout (folded components included); a 4-bit one dequantized."""
        w = self.base_layer.weight
        if self.quantized:
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
        return w.detach().to(torch.float32)

    def merged_before_live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_{p-1}, A_{p-1}): the merged update before the live component started. The merged
        factors, less the offset term ``(-b0, a0)`` when there is one (always the last r of them)."""
        if self.has_offset:
            return self.merged_B[:, :-self.r], self.merged_A[:-self.r]
        return self.merged_B, self.merged_A

    def merged_weight_norm(self) -> torch.Tensor:
        """||W0 + s B_{p-1} A_{p-1}||_F in fp32: the denominator of eq. (6)."""
        w = self.base_weight()
        if self.rank and not self.fold_merged:
            b, a = self.merged_before_live()
            w = w + self.scaling * like(w, self._delta_in_weight_layout(b, a))
        elif self.has_offset:  # the folded weight holds the offset term -s b0 a0: add it back
            w = w + self.scaling * like(w, self._delta_in_weight_layout(self.offset_B, self.offset_A))
        # A sharded W0 (FSDP2): the norm of the shards' norms, the same on every process.
        return full_tensor(torch.linalg.vector_norm(w))

    def merged_update_norm(self) -> torch.Tensor:
        """||B_{p-1} A_{p-1}||_F of the merged components, from their r x r Gram matrices."""
        b, a = self.merged_before_live()
        return torch.sum((b.T @ b) * (a @ a.T)).clamp_min(0).sqrt()

    def outer_ratio(self, criterion: str = "weight") -> torch.Tensor:
        """The left side of eq. (6): ``||s b_p a_p||_F`` over ``||W0 + s B_{p-1} A_{p-1}||_F``
        (``criterion="weight"``, the paper) or over ``||s B_{p-1} A_{p-1}||_F`` (``"update"``; +inf
        before the first merge, NaN for a non-finite live component)."""
        live = self.live_norm()
        if criterion == "weight":
            ratio = self.scaling * live / self.merged_weight_norm()
        elif criterion == "update":
            ratio = live / self.merged_update_norm().to(live.device) if self.rank else torch.full_like(live, torch.inf)
        else:
            raise ValueError(f"outer criterion {criterion!r} is invalid: expected 'weight' or 'update'")
        return torch.where(torch.isfinite(live), ratio, torch.nan)  # never merge a non-finite component

    # ---------------------------------------------------------------- Merge & Reinit
    def _kaiming_a(self) -> torch.Tensor:
        """The new ``a``'s draw (``kaiming_draw`` for this module and component)."""
        return kaiming_draw(tuple(self.lora_A.shape), self.seed, self.index, self.num_merged, self.init_scale)

    @torch.no_grad()
    def reinit_live(self, direction: torch.Tensor | None = None) -> None:
        """a <- Kaiming uniform (as PEFT's LoRA A) times ``init_scale``, b <- 0; seeded by (seed, module
        index, component).

        ``direction`` (r x in, unit rows; ``reinit="gradient"`` or ``"gradient-sign"``): ``a`` takes
        these rows instead, scaled to the Frobenius norm of the (scaled) Kaiming draw, so only the direction changes."""
        a = self._kaiming_a()
        if direction is not None:
            a = direction.to(torch.float32).cpu() * (torch.linalg.vector_norm(a) / math.sqrt(self.r))
        copy_full_(self.lora_A, a)
        self.lora_B.zero_()

    @torch.no_grad()
    def reinit_offset(self) -> None:
        """``reinit="offset"``, after ``merge_live``: the new pair starts at the merged pair's norms,
        the model's function unchanged.

        ``a0`` is ``reinit_live``'s Kaiming draw scaled to ``||a_p||_F``, ``b0`` a standard normal
        draw (seeded by (seed, module index, component, 2)) scaled to ``||b_p||_F``, for the pair
        ``(b_p, a_p)`` just merged; the live factors become ``(b0, a0)`` and ``(-b0, a0)`` joins the
        merged update, so ``W`` stays as it was. Where either norm is 0 or not finite, the plain
        re-init (Kaiming ``a``, ``b = 0``) is taken instead."""
        b_norm = torch.linalg.vector_norm(full_tensor(self.lora_B.detach())).cpu()
        a_norm = torch.linalg.vector_norm(full_tensor(self.lora_A.detach())).cpu()
        if not (torch.isfinite(a_norm) and torch.isfinite(b_norm) and a_norm > 0 and b_norm > 0):
            self.reinit_live()
            return
        a0 = self._kaiming_a()
        a0.mul_(a_norm / torch.linalg.vector_norm(a0))
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.index, self.num_merged, 2))
        b0 = torch.randn(self.lora_B.shape, generator=g, dtype=torch.float32)
        b0.mul_(b_norm / torch.linalg.vector_norm(b0))
        copy_full_(self.lora_A, a0)
        copy_full_(self.lora_B, b0)
        copy_full_(self.offset_B, b0)
        copy_full_(self.offset_A, a0)
        self.append_merged(-b0, a0)

    def _clear_offset(self) -> None:
        self.offset_A.zero_()
        self.offset_B.zero_()

    @torch.no_grad()
    def restart_b(self) -> None:
        """``reinit="previous"``: b <- 0 and ``a`` kept as trained, so the next component starts from
        the merged one's input direction."""
        self.lora_B.zero_()

    @torch.no_grad()
    def append_merged(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Add the component s*b@a to the merged update (folding it into W0 when fp32)."""
        b = b.to(device=self.merged_B.device, dtype=torch.float32)
        a = a.to(device=self.merged_A.device, dtype=torch.float32)
        self.merged_A = torch.cat([self.merged_A, a], dim=0)
        self.merged_B = torch.cat([self.merged_B, b], dim=1)
        if self.fold_merged:
            w = self.base_layer.weight
            w.add_(like(w, self._delta_in_weight_layout(b, a)), alpha=self.scaling)

    @torch.no_grad()
    def merge_live(self) -> None:
        """Merge the live component into the merged update; the live factors are left as they are.

        Its offset term, merged at its re-init, stays: together they hold ``s (b a - b0 a0)``."""
        self.append_merged(full_tensor(self.lora_B.detach()).clone(), full_tensor(self.lora_A.detach()).clone())
        self.merged_count.add_(1)
        self._clear_offset()

    @torch.no_grad()
    def drop_live(self) -> None:
        """Discard the live component (converged module, paper §3.1) and freeze the factors.

        With an offset the component's contribution is ``s (b a - b0 a0)``: its offset term, the
        last of the merged factors, is taken out too (and out of the folded weight), so the layer
        computes what it did before the component started."""
        if self.has_offset:
            b, a = self.merged_B[:, -self.r:], self.merged_A[-self.r:]
            if self.fold_merged:
                w = self.base_layer.weight
                w.sub_(like(w, self._delta_in_weight_layout(b, a)), alpha=self.scaling)
            self.merged_A = self.merged_A[:-self.r].clone()
            self.merged_B = self.merged_B[:, :-self.r].clone()
            self._clear_offset()
        self.lora_B.zero_()
        self.set_active(False)

    # ---------------------------------------------------------------- whole-weight views
    def _delta(self, merged: bool, live: bool) -> torch.Tensor:
        shape = (self.in_features, self.out_features) if self.is_conv1d else (self.out_features, self.in_features)
        delta = torch.zeros(shape, dtype=torch.float32, device=self.merged_A.device)
        if merged and self.rank:
            delta += self._delta_in_weight_layout(self.merged_B, self.merged_A)
        if live and self.active:
            delta += self._delta_in_weight_layout(full_tensor(self.lora_B.detach()), full_tensor(self.lora_A.detach()))
        return self.scaling * delta

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * (B A) in fp32 in the base weight's layout: merged plus live (if active)."""
        return self._delta(merged=True, live=True)

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        """The base layer with W0 + s B A written into its weight (what merge_and_unload returns)."""
        w = self.base_layer.weight
        w.copy_((w.to(torch.float32) + self._delta(merged=not self.fold_merged, live=True)).to(w.dtype))
        return self.base_layer

    @torch.no_grad()
    def original_base_layer(self) -> nn.Module:
        """The base layer with the folded components taken out again (W0, up to fp32 rounding)."""
        if self.fold_merged and self.rank:
            self.base_layer.weight.sub_(self._delta_in_weight_layout(self.merged_B, self.merged_A), alpha=self.scaling)
        return self.base_layer

    @torch.no_grad()
    def load_components(self, b: torch.Tensor, a: torch.Tensor, count: int | None = None) -> None:
        """Make ``s b a`` the merged update (``a``: k x in), folded one component at a time as training
        folds them; ``count`` trained components (default k / r: no offset terms among them)."""
        self.original_base_layer()
        self.merged_A = torch.zeros(0, self.in_features, device=self.merged_A.device, dtype=torch.float32)
        self.merged_B = torch.zeros(self.out_features, 0, device=self.merged_B.device, dtype=torch.float32)
        for k in range(0, a.shape[0], self.r):
            self.append_merged(b[:, k:k + self.r], a[k:k + self.r])
        self.merged_count.fill_(a.shape[0] // self.r if count is None else count)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        merged_b, merged_a = state_dict.get(prefix + "merged_B"), state_dict.get(prefix + "merged_A")
        if merged_a is not None and merged_b is not None and prefix + "base_layer.weight" not in state_dict:
            # An adapter without its base weights (PeftModel.from_pretrained, PeftModel.load_adapter):
            # its components are folded into this layer's W0 as training folded them.
            self.load_components(merged_b, merged_a)
        else:  # a whole state dict, folded weight included: the merged buffers take the saved shape
            for name, saved in (("merged_A", merged_a), ("merged_B", merged_b)):
                if saved is not None and saved.shape != getattr(self, name).shape:
                    setattr(self, name, torch.zeros(saved.shape, dtype=torch.float32, device=getattr(self, name).device))
        # Saved before reinit="offset" existed: no offset, and every merged term a trained component.
        older = merged_a is not None and not any(prefix + name in state_dict for name in OFFSET_STATE)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if older:
            missing_keys[:] = [k for k in missing_keys if k not in {prefix + name for name in OFFSET_STATE}]
            self._clear_offset()
            self.merged_count.fill_(self.merged_A.shape[0] // self.r)
        active = state_dict.get(prefix + "active")  # written by save_adapter; a loaded model stays as trainable as it was
        if active is not None:
            trainable = self.lora_A.requires_grad
            self.set_active(bool(active))
            if not trainable:
                self.lora_A.requires_grad_(False)
                self.lora_B.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, rank={self.rank}, active={self.active}, fold_merged={self.fold_merged}"
