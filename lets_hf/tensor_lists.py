"""Parameter-shaped tensor lists, whole or sharded: norms, inner products, copies.

Under FSDP2 parameters, gradients and every buffer made `*_like` them are `DTensor`s sharded
along dim 0 (shards may be uneven). A norm or an inner product is then a sum over the local
shards plus one scalar all-reduce, never a gather; a copy is a copy of the local shards.
Without sharding all of it is plain local math.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def trainable(model) -> tuple[list[str], list[torch.Tensor]]:
    """Names and parameters that train (`requires_grad`), in `named_parameters` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def trainable_with_grad(model) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Names, parameters and gradients of the trainable parameters that have a gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    return [n for n, _ in named], [p for _, p in named], [p.grad for _, p in named]


def local_shards(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dist.ProcessGroup | None]:
    """The local pieces of `tensors` and the process group that holds the rest (`None`: not sharded)."""
    if not tensors or not isinstance(tensors[0], DTensor):
        return tensors, None
    mesh = tensors[0].device_mesh
    if mesh.ndim != 1 or not all(t.placements[0].is_shard() for t in tensors):
        raise ValueError(
            "lets-hf supports DTensors sharded on a 1-d mesh (FSDP2's fully_shard); got placements "
            f"{sorted({str(t.placements) for t in tensors})} on a {mesh.ndim}-d mesh."
        )
    return [t.to_local() for t in tensors], mesh.get_group()


def _sum_over_shards(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-dim tensor: one fused kernel per dtype (and one all-reduce when sharded)."""
    if not tensors:
        return torch.zeros(())
    local, group = local_shards(tensors)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local)))
    if group is None:
        return norm
    return _sum_over_shards(norm.square(), group).sqrt()


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ⟨a_i, b_i⟩ without allocating a parameter-sized temporary (one all-reduce when sharded)."""
    (local_a, group), (local_b, _) = local_shards(a), local_shards(b)
    products = [torch.dot(x.reshape(-1), y.reshape(-1).to(x.dtype)) for x, y in zip(local_a, local_b)]
    return _sum_over_shards(torch.stack(products).sum(), group)


def copy_(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`torch._foreach_copy_` (which DTensor does not shard): shard by shard, no communication."""
    torch._foreach_copy_(local_shards(destinations)[0], local_shards(sources)[0])
