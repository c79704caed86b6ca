"""Test harness: FSDP2 on CPU processes over gloo.

Accelerate maps an FSDP plugin to `DistributedType.FSDP` only on GPU-like devices; on CPU it
silently keeps `MULTI_CPU` (DDP). torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so
this patch makes `AcceleratorState` choose FSDP on `MULTI_CPU` when a plugin is given, exactly as
it does on `MULTI_GPU`. Import it and call `enable()` before building `TrainingArguments`.
"""

from __future__ import annotations

import functools

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def enable() -> None:
    if getattr(AcceleratorState.__init__, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:  # the first init of a run: map the plugin as accelerate does on GPUs
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None:
            # Every later `AcceleratorState()` copies PartialState's MULTI_CPU back in: map it again.
            self.distributed_type = DistributedType.FSDP

    init._fsdp_on_cpu = True
    AcceleratorState.__init__ = init
