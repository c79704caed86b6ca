"""The engine's state in a checkpoint, resumable on another number of processes.

What a LETS run keeps besides θ and the optimizer (ρ, its optimizer, ∂θ/∂ρ or the trace, the antithetic and
diagnostics windows, a rule's statistics, the validation stream's position) is the same on every rank under DDP in
the global scope, so the main process writes it once (`lets_state.pt`) and any number of processes reads it. Under
FSDP2 its parameter-shaped tensors are shards: they go through PyTorch Distributed Checkpoint
(`lets_state_shards/`), which reshards them for the processes that load them, and `lets_state.pt` keeps the rest
with a placeholder for each. In the local scope on several processes each rank perturbs with its own gradient: its
state (`lets_state_rank<r>.pt`) has no meaning on another number of processes, and such a resume is refused.

`lets_layout.json` records the run's layout (processes, global batch, FSDP2 or not, scope): a continuation on
another number of processes is exact only with the same global batch (per-device batch × processes ×
accumulation) and setup, which `check_saved_layout` checks before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor import empty as empty_dtensor
from transformers.utils import logging

from .errors import UsageError, setting
from .tensor_lists import trainable

logger = logging.get_logger(__name__)

LETS_STATE_NAME = "lets_state.pt"
LAYOUT_NAME = "lets_layout.json"
SHARDS_DIR = "lets_state_shards"
_SHARD = "dcp_key"  # a placeholder's key for its tensor in SHARDS_DIR


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run splits its work: what an exact continuation must keep, or may change."""

    processes: int
    global_batch: int  # per-device batch × processes × accumulation
    sharded: bool  # FSDP2
    sam_scope: str

    @classmethod
    def of(cls, engine, global_batch: int) -> "Layout":
        return cls(engine.accelerator.num_processes, global_batch, engine.sharded, engine.args.sam_scope)


def lets_state_name(rank: int | None = None) -> str:
    """`lets_state.pt`, or `lets_state_rank<r>.pt` where each rank saves its own state."""
    if rank is None:
        return LETS_STATE_NAME
    stem, suffix = os.path.splitext(LETS_STATE_NAME)
    return f"{stem}_rank{rank}{suffix}"


def lets_state_files(rank: int) -> list[str]:
    """The names this rank's state may have in a checkpoint (which one, only the engine knows)."""
    return [lets_state_name(), lets_state_name(rank)]


def state_file(engine, directory: str) -> str:
    """This rank's file: `lets_state.pt`, or `lets_state_rank<r>.pt` where the state is rank-local."""
    return os.path.join(directory, lets_state_name(engine.accelerator.process_index if _rank_local(engine) else None))


def _rank_local(engine) -> bool:
    """Each rank has a state of its own: the local scope on several processes."""
    return engine.args.sam_scope == "local" and engine.accelerator.num_processes > 1


def save_engine_state(engine, directory: str, global_batch: int) -> None:
    """Write the engine's state into the checkpoint folder `directory`; every process calls it."""
    state, shards = _with_placeholders(engine.state_dict()) if engine.sharded else (engine.state_dict(), {})
    if shards:
        dcp.save(shards, checkpoint_id=os.path.join(directory, SHARDS_DIR))  # a collective: each rank its shards
    if _rank_local(engine) or engine.accelerator.is_main_process:
        os.makedirs(directory, exist_ok=True)
        _write_atomically(state_file(engine, directory), lambda path: torch.save(state, path))
    if engine.accelerator.is_main_process:
        text = json.dumps(dataclasses.asdict(Layout.of(engine, global_batch)), indent=1)
        _write_atomically(os.path.join(directory, LAYOUT_NAME), lambda path: open(path, "w").write(text))


def _write_atomically(path: str, write) -> None:
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written file


def load_engine_state(engine, directory: str, global_batch: int) -> None:
    """Restore what `save_engine_state` wrote, on this run's processes (checked by `check_saved_layout`)."""
    check_saved_layout(engine, directory, global_batch)
    path = state_file(engine, directory)
    if not os.path.isfile(path):
        raise UsageError(
            f"{path} is missing: this checkpoint was not written by LETSTrainer or LETSEngine with this sam_scope "
            "(or, in the local scope, this number of processes), so ρ and its optimizer state cannot be restored. "
            "Resume from such a checkpoint or start a new run."
        )
    device = engine.accelerator.device
    state = torch.load(path, map_location="cpu" if device.type == "cpu" else device, weights_only=True)
    if engine.sharded:
        state = _filled_placeholders(state, os.path.join(directory, SHARDS_DIR), trainable(engine.model)[1][0])
    engine.load_state_dict(state)


def check_saved_layout(engine, checkpoint: str, global_batch: int) -> None:
    """Refuse, saying what to change, a resume from `checkpoint` that cannot continue the run that wrote it (a
    checkpoint without `lets_layout.json`, from an older lets-hf, is not checked)."""
    path = os.path.join(checkpoint, LAYOUT_NAME)
    if os.path.isfile(path):
        with open(path) as file:
            saved = Layout(**json.load(file))
        check_layout(saved, Layout.of(engine, global_batch), checkpoint, _has_dropout(engine.model))


def check_layout(saved: Layout, current: Layout, checkpoint: str, dropout: bool) -> None:
    """Refuse a resume that cannot continue the saved run; on another number of processes, say what is exact."""
    where = f"Cannot resume from {checkpoint} on {current.processes} process(es)"
    if saved.sharded != current.sharded:
        wrote, runs = ("under FSDP2", "without it") if saved.sharded else ("without FSDP2", "under it")
        raise UsageError(f"{where}: it was written {wrote} and this run is {runs}. Resume with the same setup "
                         "(FSDP2 or not) as the run that wrote it, on any number of processes.")
    if saved.processes != current.processes and "local" in (saved.sam_scope, current.sam_scope):
        raise UsageError(
            f"{where}: it was written on {saved.processes} with {setting('sam_scope', 'local')}, where each process "
            "perturbs with its own micro-batches' gradient; that perturbation (and the state kept with it) changes "
            f"with the number of processes. Resume on {saved.processes} process(es), or start a new run."
        )
    if saved.global_batch != current.global_batch:
        raise UsageError(
            f"{where}: it was written with a global batch of {saved.global_batch} examples per optimizer step "
            f"({saved.processes} process(es)) and this run's is {current.global_batch}, so the data position and the "
            f"steps would not continue it. Set {setting('per_device_train_batch_size')} × {current.processes} "
            f"process(es) × {setting('gradient_accumulation_steps')} = {saved.global_batch}."
        )
    if saved.processes == current.processes:
        return
    exactness = (
        "Dropout draws from each process's own random generator, which cannot carry over to another number of "
        "processes: the continuation is a valid run but not the saved run's, mask for mask."
        if dropout else
        "The model has no active dropout, so the continuation equals the saved run up to summation order."
    )
    (logger.warning if dropout else logger.info)(
        f"Resuming from {checkpoint}, written on {saved.processes} process(es), on {current.processes}: θ, the "
        f"optimizer, ρ with its optimizer and estimator state, the scheduler and the data position carry over "
        f"(global batch {current.global_batch}). {exactness}"
    )


def _has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _with_placeholders(tree) -> tuple[object, dict[str, DTensor]]:
    """`tree` with each FSDP2 `DTensor` replaced by a placeholder (its key, global shape, dtype), and the DTensors by
    key, for Distributed Checkpoint."""
    shards: dict[str, DTensor] = {}

    def placeholder(leaf):
        if not isinstance(leaf, DTensor):
            return None
        key = f"t{len(shards)}"
        shards[key] = leaf
        return {_SHARD: key, "shape": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch.")}

    return map_tree(tree, placeholder), shards


def _filled_placeholders(tree, shards_dir: str, parameter: DTensor):
    """The inverse of `_with_placeholders` on this run's processes: each tensor loaded as a shard of the parameters'
    layout (dimension 0 over their device mesh), resharded by Distributed Checkpoint from however it was saved."""
    mesh, shards = parameter.device_mesh, {}

    def fill(leaf):
        if not (isinstance(leaf, dict) and _SHARD in leaf):
            return None
        shards[leaf[_SHARD]] = empty_dtensor(*leaf["shape"], dtype=getattr(torch, leaf["dtype"]), device_mesh=mesh,
                                             placements=[Shard(0)])
        return shards[leaf[_SHARD]]

    tree = map_tree(tree, fill)
    if shards:
        dcp.load(shards, checkpoint_id=shards_dir)  # in place
    return tree


def map_tree(tree, convert):
    """`tree` (dicts, lists, tuples) with each node that `convert` maps (to something other than `None`) replaced."""
    converted = convert(tree)
    if converted is not None:
        return converted
    if isinstance(tree, dict):
        return {key: map_tree(value, convert) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tree(value, convert) for value in tree)
    return tree
