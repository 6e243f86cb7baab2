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


class AromaLinear(nn.Module):
    """``W0 x + bias + s (B_{p-1} A_{p-1}) x + s (b_p a_p) x`` with ``s = alpha / r`` (paper eq. 4).

    The live factors ``lora_A`` (r x in) and ``lora_B`` (out x r) are the only parameters this
    layer adds; they are created once and re-initialized in place at every Merge & Reinit, so
    optimizers, DDP and checkpoints keep the same Parameter objects.

    Merged components are kept exactly, in fp32, in the buffers ``merged_A`` (k x in) and
    ``merged_B`` (out x k). When the base weight is fp32 they are also folded into it at merge
    time, so they cost nothing per step; a bf16/fp16 base weight is never modified (a small
    update would be rounded away) and the merged factors are applied as a side path instead.

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
        """Number of merged rank-r components (p - 1 while training)."""
        return self.merged_A.shape[0] // self.r

    @property
    def rank(self) -> int:
        """Rank of the merged update (components x r): what export and the figures report."""
        return self.merged_A.shape[0]

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
        """||B_live A_live||_F from the factors: sqrt(<B^T B, A A^T>), no out x in product (eq. 5)."""
        a, b = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
        return torch.sum((b.T @ b) * (a @ a.T)).clamp_min(0).sqrt()

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

    def merged_weight_norm(self) -> torch.Tensor:
        """||W0 + s B_{p-1} A_{p-1}||_F in fp32: the denominator of eq. (6)."""
        w = self.base_weight()
        if self.rank and not self.fold_merged:
            w = w + self.scaling * like(w, self._delta_in_weight_layout(self.merged_B, self.merged_A))
        # A sharded W0 (FSDP2): the norm of the shards' norms, the same on every process.
        return full_tensor(torch.linalg.vector_norm(w))

    def merged_update_norm(self) -> torch.Tensor:
        """||B_{p-1} A_{p-1}||_F of the merged components, from their r x r Gram matrices."""
        a, b = self.merged_A, self.merged_B
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
    @torch.no_grad()
    def reinit_live(self, direction: torch.Tensor | None = None) -> None:
        """a <- Kaiming uniform (as PEFT's LoRA A) times ``init_scale``, b <- 0; seeded by (seed, module
        index, component).

        ``direction`` (r x in, unit rows; ``reinit="gradient"`` or ``"gradient-sign"``): ``a`` takes
        these rows instead, scaled to the Frobenius norm of the (scaled) Kaiming draw, so only the direction changes."""
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.index, self.num_merged, 0))
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        a.mul_(self.init_scale)  # exact for the default 1.0
        if direction is not None:
            a = direction.to(torch.float32).cpu() * (torch.linalg.vector_norm(a) / math.sqrt(self.r))
        copy_full_(self.lora_A, a)
        self.lora_B.zero_()

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
        """Merge the live component into the merged update; the live factors are left as they are."""
        self.append_merged(full_tensor(self.lora_B.detach()).clone(), full_tensor(self.lora_A.detach()).clone())

    @torch.no_grad()
    def drop_live(self) -> None:
        """Discard the live component (converged module, paper §3.1) and freeze the factors."""
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
    def load_components(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Make ``s b a`` the merged update (``a``: k x in), folded one component at a time as training folds them."""
        self.original_base_layer()
        self.merged_A = torch.zeros(0, self.in_features, device=self.merged_A.device, dtype=torch.float32)
        self.merged_B = torch.zeros(self.out_features, 0, device=self.merged_B.device, dtype=torch.float32)
        for k in range(0, a.shape[0], self.r):
            self.append_merged(b[:, k:k + self.r], a[k:k + self.r])

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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        active = state_dict.get(prefix + "active")  # written by save_adapter; a loaded model stays as trainable as it was
        if active is not None:
            trainable = self.lora_A.requires_grad
            self.set_active(bool(active))
            if not trainable:
                self.lora_A.requires_grad_(False)
                self.lora_B.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, rank={self.rank}, active={self.active}, fold_merged={self.fold_merged}"
