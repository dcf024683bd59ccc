"""A layer's KV heads split over processes (tensor parallelism): the reductions a stage makes over heads.

Under transformers' tensor parallelism each rank holds a contiguous block of every layer's KV heads (rank ``r``
of ``w`` holds heads ``[r * h, (r + 1) * h)``). Most stages decide per head and need nothing from other ranks.
The few that reduce over a layer's heads (TOVA's shared score, AdaKV's top-k over heads, HAE's attention
averaged over heads, MEDA's and VL-Cache's layer signals, MadaKV's head demands) call these functions, which
span every rank of the layer's head group: they gather the other ranks' heads (so the reduction runs as in one
process, in head order) or sum across ranks. ``group`` is the process group's name (``LayerPlacement.heads``);
"" means this process holds every head, and every function is then the identity (no communication).

They run inside the operators' kernels, so a compiled graph holds one opaque operator per stage, not a graph
break; the collectives are functional ones (``torch.distributed._functional_collectives``).
"""

from __future__ import annotations

import torch


def world_size(group: str) -> int:
    """How many processes the heads are split over (1 when ``group`` is "")."""
    if not group:
        return 1
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group).size()


def gather_heads(tensor: torch.Tensor, group: str, dim: int = 1) -> torch.Tensor:
    """Every rank's heads of ``tensor``, concatenated along ``dim`` in rank (so head) order."""
    if not group:
        return tensor
    from torch.distributed import _functional_collectives as funcol

    dtype = tensor.dtype
    wire = tensor.to(torch.uint8) if dtype == torch.bool else tensor  # collectives take no bool tensors
    gathered = funcol.all_gather_tensor(wire.contiguous(), gather_dim=dim, group=group)
    return funcol.wait_tensor(gathered).to(dtype)


def local_heads(tensor: torch.Tensor, group: str, dim: int = 1) -> torch.Tensor:
    """This rank's block of an all-heads ``tensor`` (the inverse of :func:`gather_heads`)."""
    if not group:
        return tensor
    from torch.distributed.distributed_c10d import _resolve_process_group

    process_group = _resolve_process_group(group)
    size = tensor.shape[dim] // process_group.size()
    return tensor.narrow(dim, process_group.rank() * size, size)


def sum_over_ranks(tensor: torch.Tensor, group: str) -> torch.Tensor:
    """``tensor`` summed over the ranks (a partial sum over this rank's heads becomes the sum over all)."""
    if not group:
        return tensor
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))
