"""The study scripts' judgements, on hand-made numbers: which way a signal pushes ρ, which ρ values get extra
seeds, and a run's share of SAM steps. (Their runs need ../shared/data; these checks do not.)

The scripts import their siblings by path, so each check runs in its own interpreter, as the scripts do."""

import json
import subprocess
import sys

from tests.conftest import REPO

CHECKS = r"""
import json, sys
sys.path.insert(0, "benchmarks/glue")
import numpy as np
import signal_map, policy_study

verdicts = {
    "below, pushed up": signal_map.verdict(-3.0, 0.005, 0.02),  # dF/dρ < 0 below the best: ρ grows, right
    "below, pushed down": signal_map.verdict(+3.0, 0.01, 0.02),
    "above, pushed down": signal_map.verdict(+2.5, 0.2, 0.02),
    "above, noise": signal_map.verdict(-1.0, 0.1, 0.02),
    "at best": signal_map.verdict(+5.0, 0.02, 0.02),
}
around = {str(best): signal_map.around(best) for best in (0.02, 0.01, 0.005)}
log = [{"step": 5, "sam_step_share": 1.0}, {"step": 10, "sam_step_share": 0.2}, {"step": 12, "sam_step_share": 0.5}]
share = policy_study.sam_step_share({"log_history": log})
records = [{"log_history": [{"epoch": 0.5, "rho_probe_mu0_val_loss": 2.0}, {"epoch": 1.5, "rho_probe_mu0_val_loss": -4.0},
                            {"epoch": 2.0, "loss": 1.0}]}]
later = signal_map.signal(records, 0.0, "val_loss", 0.1, "later").tolist()
print(json.dumps({"verdicts": verdicts, "around": around, "share": share, "later": later}))
"""


def test_the_study_scripts_judge_hand_made_numbers():
    done = subprocess.run([sys.executable, "-c", CHECKS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["verdicts"] == {
        "below, pushed up": "right",
        "below, pushed down": "WRONG",
        "above, pushed down": "right",
        "above, noise": "WRONG (noise)",
        "at best": "at best",
    }
    # seeds 1 and 2 go to the neighbours of the best (both above it at the map's edge)
    assert result["around"] == {"0.02": [0.01, 0.05], "0.01": [0.005, 0.02], "0.005": [0.01, 0.02]}
    assert result["share"] == (5 * 1.0 + 5 * 0.2 + 2 * 0.5) / 12  # each log window weighted by its steps
    assert result["later"] == [0.1 * -4.0]  # dF/d log ρ = ρ·dF/dρ, epochs after the first, logs with the key only
