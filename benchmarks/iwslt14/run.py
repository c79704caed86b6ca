"""Translation benchmark: adamw / SAM / LETS-SAM with `lets-hf iwslt14` on real De-En data.

Every (dataset, method, seed) is one in-process call of `lets_hf.tasks.iwslt14.main.main`
with its own output dir `<out_dir>/runs/<dataset>/<method>/seed<k>/`; its results (BLEU,
wall time, training log with losses and ρ) are then saved as `.../seed<k>.json`. A finished
run whose saved settings match is skipped, so an interrupted benchmark resumes where it
stopped; several workers can share one --out_dir (each run is claimed before it starts).
`report.py` rebuilds the table and curves from those files alone.

    python benchmarks/iwslt14/run.py                   # cpu: IWSLT'14 subset + Multi30k, ~2 h on 2 cores
    python benchmarks/iwslt14/run.py --profile paper --data_dir /path/to/iwslt14   # full recipe (GPU)
    python benchmarks/iwslt14/run.py --profile smoke --out_dir /tmp/iwslt-smoke    # end-to-end check, minutes

Multi30k ships raw (cased, untokenized, `val` instead of `valid`): it is Moses-tokenized and
lowercased with tasks/iwslt14/prepare.py's functions into --cache_dir first, so that both
datasets reach the task in the layout and preprocessing of fairseq's IWSLT'14 recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lets_hf.methods import METHODS
from lets_hf.tasks.iwslt14.main import main as iwslt14_main
from lets_hf.tasks.iwslt14.prepare import LANGS, lowercase, moses_tokenize, read_lines, write_lines

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from report import write_report  # noqa: E402  (sibling script, not a package)
from saved_runs import run_path, save_run, to_run  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results" / "iwslt14"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lets-hf" / "iwslt14-benchmark"
DEFAULT_METHODS = ("adamw", "sam", "lets-sam")
#: Raw Multi30k split name -> the task's split name.
MULTI30K_SPLITS = {"train": "train", "val": "valid", "test": "test"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Where a dataset lives and how much of it a run uses (None = all)."""

    data_dir: str | None  # None: the --data_dir flag
    raw_multi30k: bool = False
    train_samples: int | None = None
    eval_samples: int | None = None
    epochs: float = 1.0
    bpe_merges: int = 10000


@dataclasses.dataclass(frozen=True)
class Profile:
    """Model shape and the recipe flags a profile overrides; shared by all methods and seeds."""

    arch: str
    datasets: dict[str, Dataset]
    seeds: tuple[int, ...]
    overrides: dict[str, object]  # extra `lets-hf iwslt14` flags; absent = the recipe's default


IWSLT_SUBSET = str(SHARED_DATA / "iwslt14.tokenized.de-en")
MULTI30K = str(SHARED_DATA / "multi30k-de-en")
# cpu: transformer_small, 4096-token batches, sized from a measured step time to ~2 h on 2 idle cores
# (estimate in README.md).
# The recipe's 4000 warmup steps would exceed a CPU run's length, so warmup is shortened and the
# peak lr raised to 1e-3 (fairseq's usual value for small transformers); BPE merges are scaled
# down to the smaller training sets (10k merges on 7k pairs would leave most types rare).
PROFILES = {
    "cpu": Profile(
        arch="transformer_small",
        datasets={
            "iwslt14-subset": Dataset(IWSLT_SUBSET, epochs=10, bpe_merges=4000),
            "multi30k": Dataset(MULTI30K, raw_multi30k=True, epochs=4, bpe_merges=6000),
        },
        seeds=(0,),
        overrides={"learning_rate": 1e-3, "warmup_steps": 200, "logging_steps": 10},
    ),
    "paper": Profile(
        arch="transformer_iwslt_de_en",
        datasets={"iwslt14": Dataset(None, epochs=50)},
        seeds=(0, 1, 2),
        overrides={"logging_steps": 100, "bf16": True},
    ),
    "smoke": Profile(
        arch="transformer_tiny",
        datasets={
            "iwslt14-subset": Dataset(IWSLT_SUBSET, train_samples=200, eval_samples=20, epochs=2, bpe_merges=300),
            "multi30k": Dataset(
                MULTI30K, raw_multi30k=True, train_samples=200, eval_samples=20, epochs=2, bpe_merges=300
            ),
        },
        seeds=(0,),
        overrides={"max_tokens": 1024, "warmup_steps": 2, "logging_steps": 1, "num_beams": 2, "max_new_tokens": 30},
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu")
    parser.add_argument("--datasets", nargs="+", help="Subset of the profile's datasets (default: all).")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, help="Default: the profile's.")
    parser.add_argument("--data_dir", help="IWSLT'14 data (tokenized layout or raw release) for --profile paper.")
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="Where raw Multi30k is tokenized once.")
    parser.add_argument("--keep_models", action="store_true", help="Keep each run's weights (default: deleted).")
    return parser.parse_args(argv)


def prepare_multi30k(raw_dir: Path, cache_dir: Path) -> Path:
    """Raw Multi30k as the recipe's tokenized layout: Moses-tokenized, lowercased, `val` renamed `valid`."""
    prepared = cache_dir / f"{raw_dir.name}.tokenized"
    done = prepared / "DONE"
    if done.is_file():
        return prepared
    prepared.mkdir(parents=True, exist_ok=True)
    for raw_split, split in MULTI30K_SPLITS.items():
        for lang in LANGS:
            lines = read_lines(raw_dir / f"{raw_split}.{lang}")
            tokenized = moses_tokenize(lines, lang, f"tokenize {raw_split}.{lang}")
            write_lines(prepared / f"{split}.{lang}", lowercase(tokenized))
    done.touch()  # a half-written folder is never mistaken for a finished one
    return prepared


def task_argv(profile: Profile, dataset: Dataset, method: str, seed: int) -> list[str]:
    """The `lets-hf iwslt14` flags of one run, except --data_dir and --output_dir."""
    flags = {
        "arch": profile.arch,
        "method": method,
        "seed": seed,
        "num_train_epochs": dataset.epochs,
        "bpe_merges": dataset.bpe_merges,
        "max_train_samples": dataset.train_samples,
        "max_eval_samples": dataset.eval_samples,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        **profile.overrides,
    }
    return [item for name, value in flags.items() if value is not None for item in (f"--{name}", str(value))]


def collect(run_dir: Path) -> dict:
    """BLEU, losses and the training log that the task wrote into its output dir."""
    results = {}
    for split in ("eval", "test"):
        path = run_dir / f"{split}_results.json"
        if path.is_file():
            results.update(json.loads(path.read_text()))
    state = json.loads((run_dir / "trainer_state.json").read_text())
    train = json.loads((run_dir / "train_results.json").read_text())
    return {
        "metrics": results,
        "train_runtime_s": train["train_runtime"],
        "steps": state["global_step"],
        "log_history": state["log_history"],
    }


def resolve_data_dir(name: str, dataset: Dataset, args: argparse.Namespace) -> Path:
    if dataset.data_dir is None:
        if not args.data_dir:
            raise SystemExit(f"--profile {args.profile} needs --data_dir (the IWSLT'14 data of dataset {name}).")
        return Path(args.data_dir)
    if dataset.raw_multi30k:
        return prepare_multi30k(Path(dataset.data_dir), Path(args.cache_dir))
    return Path(dataset.data_dir)


def train_one(run_dir: Path, data_dir: Path, argv: list[str], keep_models: bool) -> dict:
    """One run of the task in `run_dir`; its results, with the model weights deleted unless `keep_models`."""
    shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an interrupted run
    start = time.perf_counter()
    iwslt14_main(["--data_dir", str(data_dir), "--output_dir", str(run_dir), *argv])
    result = {"wall_time_s": time.perf_counter() - start, **collect(run_dir)}
    if not keep_models:
        for weights in run_dir.glob("*.safetensors"):
            weights.unlink()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    names = args.datasets or list(profile.datasets)
    unknown = set(names) - set(profile.datasets)
    if unknown:
        raise SystemExit(f"Profile {args.profile} has no dataset {sorted(unknown)}: choose {list(profile.datasets)}.")
    out_dir = Path(args.out_dir)
    print(f"profile {args.profile}: {profile}", flush=True)
    # Seed-major order: an interrupted benchmark still has every dataset and method for its first seeds.
    for seed in args.seeds or profile.seeds:
        for name in names:
            dataset = profile.datasets[name]
            for method in args.methods:
                argv_ = task_argv(profile, dataset, method, seed)
                settings = {"dataset": name, "source": dataset.data_dir or args.data_dir, "argv": argv_}
                path = run_path(out_dir, name, method, seed)
                with to_run(path, settings) as mine:
                    if not mine:
                        continue
                    result = train_one(path.with_suffix(""), resolve_data_dir(name, dataset, args), argv_, args.keep_models)
                    save_run(path, {"dataset": name, "method": method, "seed": seed, "settings": settings, **result})
                bleu = {k: round(v, 2) for k, v in result["metrics"].items() if k.endswith("_bleu")}
                print(f"{name} {method} seed{seed}: {bleu} steps {result['steps']} "
                      f"wall {result['wall_time_s']:.0f}s", flush=True)
    write_report(out_dir)


if __name__ == "__main__":
    main()
