"""FSDP2's DTensors, read and written whole: full tensors in, each process cutting its own shard.

FSDP2 (``fully_shard``) turns parameters into DTensors, each process holding a shard. These helpers
let the layer, the Reset and the IO read whole factors and write whole updates without caring
which they have; every process computes the same whole tensor, so each can cut its own shard (no
communication).
"""

from __future__ import annotations

import torch


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every shard for a DTensor, ``t`` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(ref: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``ref``: cut into ``ref``'s shards when ``ref`` is a DTensor."""
    whole = whole.to(device=ref.device, dtype=ref.dtype)
    if not hasattr(ref, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, ref.device_mesh, ref.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(dst: torch.Tensor, whole: torch.Tensor) -> None:
    """``dst <- whole`` (``whole`` is the same on every process)."""
    dst.copy_(like(dst, whole))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a DTensor (FSDP2), ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
