"""Which distributed setups LETS runs under, and cross-rank reductions for the global scope. No math about SAM
lives here.

Under DDP the first pass runs under `no_sync`; in the global scope its gradient is then averaged
with exactly one coalesced all-reduce (a flat buffer allocated once), and the scalars of
the ρ update with one more tiny all-reduce on the steps that update ρ. Under FSDP2 the
gradient is reduce-scattered by FSDP2 itself (LETS's state is saved shard by shard: `lets_hf.engine_state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType

from .config import check_fsdp2_settings
from .errors import UsageError, setting


def check_distributed_type(accelerator, args) -> bool:
    """DDP or FSDP2 (returns whether parameters are sharded); FSDP1 and DeepSpeed are refused."""
    distributed_type = accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED or (
        distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2
    ):
        name = "FSDP1" if distributed_type == DistributedType.FSDP else "DeepSpeed"
        raise UsageError(
            f"LETS does not support {name}: its engine owns the gradient buffers the perturbation needs. Launch "
            "with FSDP2 (accelerate launch --config_file examples/accelerate_fsdp2.yaml, or "
            f"{setting('fsdp_config', {'version': 2})}) or with DDP (accelerate launch --multi_gpu)."
        )
    if distributed_type != DistributedType.FSDP:
        return False
    check_fsdp2_settings(args)  # launched from an accelerate config: TrainingArguments never saw it
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GradientAverager:
    """Averages lists of tensors over ranks through one flat buffer that lives across steps."""

    def __init__(self):
        self._flat: torch.Tensor | None = None

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        if world_size() == 1 or not tensors:
            return
        numel = sum(t.numel() for t in tensors)
        if self._flat is None or self._flat.numel() != numel or self._flat.dtype != tensors[0].dtype:
            self._flat = torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
        views = self._views(tensors)
        torch._foreach_copy_(views, [t.reshape(-1) for t in tensors])
        dist.all_reduce(self._flat, op=dist.ReduceOp.AVG if _has_avg() else dist.ReduceOp.SUM)
        if not _has_avg():
            self._flat.div_(world_size())
        torch._foreach_copy_([t.view(-1) for t in tensors], views)

    def _views(self, tensors):
        views, offset = [], 0
        for t in tensors:
            views.append(self._flat[offset : offset + t.numel()])
            offset += t.numel()
        return views


def average_scalars(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small 1-d tensor of scalars (identity on one process)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def reshard(model: torch.nn.Module) -> None:
    """After a forward without backward under FSDP2: free the unsharded parameters that FSDP2 keeps for the
    backward that never comes (the root's), so the next forward all-gathers the current shards again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def same_on_all_ranks(value: int, device) -> tuple[int, int]:
    """(min, max) of an integer over ranks, in one all-reduce: equal when every rank holds the same value."""
    if world_size() == 1:
        return value, value
    both = torch.tensor([value, -value], dtype=torch.long, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return int(-both[1]), int(both[0])


def _has_avg() -> bool:
    """gloo has no ReduceOp.AVG; NCCL does."""
    return dist.get_backend() == "nccl"
