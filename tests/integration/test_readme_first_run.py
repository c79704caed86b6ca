"""The README's first training command, exactly as written there: it learns (issue #15's bar: ≥ 80% SST-2
dev accuracy; its wall time, ≤ 5 min on 2 cores, is measured by benchmarks/first_run.py, not here)."""

import json
import re
import shlex
import subprocess
import sys

from tests.conftest import REPO


def readme_first_training_command() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    command = next(line for line in block.replace("\\\n", " ").splitlines() if line.startswith("lets-hf "))
    return shlex.split(command.split("#")[0])


def test_the_readme_first_command_learns_and_says_where_its_outputs_are(tmp_path):
    argv = readme_first_training_command()
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "sst2")
    done = subprocess.run([sys.executable, "-m", "lets_hf.cli", *argv[1:]], capture_output=True, text=True,
                          cwd=REPO, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = json.loads((tmp_path / "sst2" / "eval_results.json").read_text())["eval_accuracy"]
    assert accuracy >= 0.80
    assert f"Results: {tmp_path / 'sst2' / 'eval_results.json'}" in done.stdout
    assert f"{tmp_path / 'sst2' / 'rho_curve.png'}" in done.stdout and (tmp_path / "sst2" / "rho_curve.png").is_file()
