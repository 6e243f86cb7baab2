"""A low-memory sketch of a frozen linear's weight gradient, for ``AromaConfig.reinit="gradient"``.

After a Merge & Reinit the new component starts at ``b = 0``, so for a while the only thing that
moves the weight is ``b``, along ``s G a^T``: the paper draws ``a`` at random, and the component
then trains in a direction the data did not choose. With ``reinit="gradient"`` the new ``a`` is
the top right singular vector(s) of the module's weight gradient ``G = dL/dW`` (LoRA-GA's idea for
LoRA's initialization), so that ``b``'s first steps already go where the loss falls fastest.

``G`` (out x in) is never formed. Each step adds the two linear sketches of a single-pass randomized
SVD (Tropp, Yurtsever, Udell and Cevher 2017, "Practical sketching algorithms for low-rank matrix
approximation"): ``Y = G Omega`` (out x k) and ``Z = Psi G`` (l x in), from the layer's input ``X``
and the gradient of its output ``D`` (``G = D^T X``): ``Y += D^T (X Omega)``, ``Z += (Psi D^T) X``.
Both are linear in ``G``, so micro-batches and data-parallel processes add up, and the window they
cover is the steps since the last inner check (``check_interval`` steps: the gradient where the
component that is about to be merged left the loss). ``G ~= Q (Psi Q)^+ Z`` with ``Q = orth(Y)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .seeds import derived_seed


class GradientSketch:
    """The sketches ``Y = G Omega`` and ``Z = Psi G`` of one layer's weight gradient ``G`` (out x in).

    ``pending`` holds what the backward passes of the current optimizer step added; ``commit()``
    moves it into the window (a skipped non-finite step calls ``discard()`` instead) and ``clear()``
    starts a new window.
    """

    def __init__(self, in_features: int, out_features: int, r: int, seed: int, index: int, device=None):
        self.k = r + 7  # range sketch width: the top r directions plus oversampling
        self.l = 2 * self.k + 1  # co-range sketch height (Tropp et al.: l >= 2k + 1)
        gen = torch.Generator().manual_seed(derived_seed(seed, index, 2))
        self.omega = torch.randn(in_features, self.k, generator=gen).to(device)
        self.psi = torch.randn(self.l, out_features, generator=gen).to(device)
        self.y = torch.zeros(out_features, self.k, device=device)
        self.z = torch.zeros(self.l, in_features, device=device)
        self.pending_y = torch.zeros_like(self.y)
        self.pending_z = torch.zeros_like(self.z)

    @torch.no_grad()
    def add(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Add ``G = D^T X`` of one backward pass: ``x`` (..., in) the layer's input, ``grad_out``
        (..., out) the gradient of its output."""
        x = x.reshape(-1, x.shape[-1]).to(self.omega.device, torch.float32)
        d = grad_out.reshape(-1, grad_out.shape[-1]).to(self.omega.device, torch.float32)
        self.pending_y += d.T @ (x @ self.omega)
        self.pending_z += (self.psi @ d.T) @ x

    def commit(self) -> None:
        self.y += self.pending_y
        self.z += self.pending_z
        self.discard()

    def discard(self) -> None:
        self.pending_y.zero_()
        self.pending_z.zero_()

    def clear(self) -> None:
        self.y.zero_()
        self.z.zero_()

    @torch.no_grad()
    def top_right(self, r: int) -> torch.Tensor | None:
        """The top ``r`` right singular vectors of the window's gradient (r x in, orthonormal rows,
        each with its largest entry positive), summed over the processes of a distributed run;
        None when no gradient reached the window."""
        y, z = self.y.clone(), self.z.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(y)
            dist.all_reduce(z)
        if not torch.isfinite(y).all() or not torch.isfinite(z).all() or not y.abs().max() > 0:
            return None
        q, _ = torch.linalg.qr(y.double())
        core = torch.linalg.lstsq(self.psi.double() @ q, z.double()).solution  # k x in: G ~= q @ core
        _, _, vh = torch.linalg.svd(core, full_matrices=False)
        v = vh[:r]
        sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
        v = (v * sign).to(torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(v, 0)  # bitwise the same direction on every process
        return v

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"y": self.y.cpu(), "z": self.z.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.y.copy_(state["y"])
        self.z.copy_(state["z"])
        self.discard()
