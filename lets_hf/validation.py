"""The upper-level validation data: a held-out split of train, and a resumable batch stream.

D_val must be held out from the *training* data (never the evaluation split): the gap
L_val − L_train measures generalization of what the lower level fits.
"""

from __future__ import annotations

import contextlib
import random

import torch
from torch.utils.data import Dataset, Subset

from .errors import UsageError, setting


def split_for_rho(train_dataset, fraction: float, seed: int, count: int | None = None):
    """Split `train_dataset` into (train, rho) with a fixed seed; the parts never overlap. `count`, when
    given, is the number of examples held out (instead of `fraction` of them)."""
    n = len(train_dataset)
    n_rho = count if count is not None else max(1, round(fraction * n))
    if n_rho >= n:
        raise UsageError(
            f"train_dataset has {n} examples: too few to hold out {n_rho} for the ρ validation set and still train. "
            "Pass separate validation data (LETSTrainer's rho_dataset; in a plain loop, your own dataset to "
            f"RhoBatches), or lower {setting('rho_val_fraction')} ({setting('rho_antithetic_batches')} or "
            f"{setting('rho_batch_size')} with the antithetic estimator)."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    rho_indices, train_indices = sorted(order[:n_rho]), sorted(order[n_rho:])
    return _select(train_dataset, train_indices), _select(train_dataset, rho_indices)


def validation_batch_size(args, per_device_train_batch_size: int) -> int:
    """ρ's validation batch per device: `rho_batch_size`, or the training micro-batch when unset. The caller
    passes the micro-batch, since `LETSArguments` alone (in a plain loop's config) has none of its own."""
    return args.rho_batch_size or per_device_train_batch_size


def antithetic_held_out(args, per_device_train_batch_size: int, world_size: int) -> int | None:
    """Examples to hold out for ρ when the estimator is antithetic: exactly its fixed batches (fewer than
    `rho_val_fraction` usually, so training keeps more data); `None` for the other estimators."""
    if args.rho_estimator != "antithetic":
        return None
    return args.rho_antithetic_batches * validation_batch_size(args, per_device_train_batch_size) * world_size


def _select(dataset, indices: list[int]):
    if hasattr(dataset, "select"):  # datasets.Dataset keeps its columns and features
        return dataset.select(indices)
    return Subset(dataset, indices)


class RhoBatches:
    """Endless, seeded stream of validation batches, sharded so that N ranks see one global batch.

    Every global batch holds `world_size * batch_size` examples drawn without replacement
    from a per-epoch permutation; rank r gets the r-th slice. A single process with
    `world_size * batch_size` examples per batch sees exactly the same examples, which is
    what makes multi-rank ρ equal the single-rank ρ. `state_dict` makes it resumable.
    """

    def __init__(self, dataset: Dataset, collate_fn, batch_size: int, world_size: int, rank: int, seed: int):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise UsageError(
                f"The ρ validation set has {len(dataset)} examples, fewer than one global validation batch "
                f"({world_size} processes x {setting('rho_batch_size', batch_size)}). Lower {setting('rho_batch_size')} "
                f"or give more validation data (LETSTrainer's rho_dataset or a larger {setting('rho_val_fraction')}; in "
                "a plain loop, a larger dataset to RhoBatches)."
            )
        self.batches_per_epoch = len(dataset) // self.global_batch
        self.drawn = 0
        self._epoch, self._order = -1, []

    def __next__(self):
        epoch, position = divmod(self.drawn, self.batches_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, as Python ints: batches need no tensor reads
            n = len(self.dataset)
            self._epoch, self._order = epoch, random.Random(self.seed + epoch).sample(range(n), n)
        start = position * self.global_batch + self.rank * self.batch_size
        self.drawn += 1
        return self.collate_fn([self.dataset[i] for i in self._order[start : start + self.batch_size]])

    def restarted(self) -> "RhoBatches":
        """The same stream from its first batch, leaving this one where it is."""
        return RhoBatches(self.dataset, self.collate_fn, self.batch_size, self.world_size, self.rank, self.seed)

    def pass_seed(self) -> int:
        """Seed of the validation pass on the batch drawn last: a function of (rho_seed, batch, rank) only,
        so a resumed run draws the same dropout masks without saving a random state."""
        return (self.seed << 40) ^ (self.drawn << 12) ^ self.rank

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """The position in the stream: the same global batches on any number of processes, if they are as large."""
        saved = state.get("global_batch", self.global_batch)  # absent before lets-hf resumed on other world sizes
        if saved != self.global_batch:
            raise UsageError(
                f"The checkpoint's ρ validation batches hold {saved} examples over all processes, and this run's "
                f"{self.global_batch} ({self.world_size} processes x {setting('rho_batch_size', self.batch_size)}): "
                f"the stream would not continue where it stopped. Set {setting('rho_batch_size')} to "
                f"{saved} / {self.world_size} processes."
            )
        self.drawn = state["drawn"]


@contextlib.contextmanager
def own_random_stream(seed: int, device: torch.device):
    """Run the block on its own seeded random stream and give the caller's stream (CPU and `device`) back
    untouched: the validation passes then change no dropout mask of the training passes, so a LETS run
    with a frozen ρ draws exactly as SAM does."""
    accelerated = device.type != "cpu"
    devices = [device.index or 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        torch.manual_seed(seed)
        yield
