"""examples/accelerate_loop.py on CPU processes under FSDP2 (the `fsdp_on_cpu` harness), for `accelerate launch
--config_file examples/accelerate_fsdp2.yaml`: accelerate alone would run DDP there."""

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.distributed import fsdp_on_cpu  # noqa: E402

fsdp_on_cpu.enable()
runpy.run_path(str(REPO / "examples" / "accelerate_loop.py"), run_name="__main__")
