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
later = [x.tolist() for x in signal_map.signal(records, 0.0, "val_loss", 0.1, "later")]
noise = np.random.default_rng(0).standard_normal(20000)
ar = np.zeros_like(noise)
for i in range(1, noise.size):
    ar[i] = 0.9 * ar[i - 1] + np.sqrt(1 - 0.81) * noise[i]
tau = {"iid": signal_map.autocorrelation_time(noise - noise.mean()), "ar0.9": signal_map.autocorrelation_time(ar - ar.mean())}
naive = lambda x: x.mean() / (x.std() / np.sqrt(x.size))  # every window counted as independent
t = {"iid": signal_map.t_statistic([noise[:1000] + 0.1, noise[1000:2000] + 0.1]) / naive(noise[:2000] + 0.1),
     "ar0.9": signal_map.t_statistic([ar[:2000] + 0.1]) / naive(ar[:2000] + 0.1)}
print(json.dumps({"verdicts": verdicts, "around": around, "share": share, "later": later, "tau": tau, "t": t}))
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
    assert result["later"] == [[0.1 * -4.0]]  # dF/d log ρ = ρ·dF/dρ, epochs after the first, logs with the key only
    # independent windows count as themselves; an AR(1) series with φ = 0.9 as (1 + φ)/(1 − φ) = 19 times fewer
    assert 0.9 < result["tau"]["iid"] < 1.1 and 16 < result["tau"]["ar0.9"] < 22
    # t against the naive t: about the same for independent windows (two runs pooled), about 1/√19 for AR(1)
    assert 0.9 < result["t"]["iid"] < 1.1 and 0.15 < result["t"]["ar0.9"] < 0.35
