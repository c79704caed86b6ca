"""The LETS fields and their validation (`LETSArguments`), and the configs that join them to
`TrainingArguments` (`LETSConfig`) and `Seq2SeqTrainingArguments` (`LETSSeq2SeqConfig`).

`LETSArguments` is a plain dataclass holding only the LETS fields, so it joins any
`TrainingArguments` subclass in either base order without touching that class's defaults, and
configures `LETSEngine` alone in a loop without Trainer:

    @dataclass
    class MyConfig(LETSArguments, MyTrainingArguments): ...
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import is_torch_bf16_available_on_device, is_torch_bf16_gpu_available, is_torch_xla_available
from transformers.utils import logging

from .errors import UsageError, setting, unset
from .policies import SAM_POLICIES
from .rules import available_rules
from .rules.bisam import BISAM_SURROGATES

SCOPES = ("global", "local")
RHO_OPTIMIZERS = ("adam", "sgd")
RHO_STEP_RULES = ("optimizer", "evidence")
RHO_HESSIANS = ("diagonal", "exact", "identity")
RHO_ESTIMATORS = ("one-step", "trace", "antithetic")
RHO_OBJECTIVES = ("squared-gap", "val-loss")
RHO_TRAIN_BATCHES = ("next", "last")
RHO_VAL_BATCHES = ("held-out", "next")
RHO_UPDATE_SPACES = ("linear", "log")

logger = logging.get_logger(__name__)


@dataclass
class LETSArguments:
    r"""
    The LETS fields, for any `TrainingArguments` subclass (see the module docstring).

    Parameters:
        > Perturbation (the lower level: SAM or a variant)

        sam_variant (`str`, defaults to `"sam"`):
            Perturbation rule: `"none"` (plain training, identical to `Trainer`), `"sam"`,
            `"asam"`, or any rule registered in `lets_hf.rules`.
        rho (`float` or `None`, defaults to `None`):
            Perturbation radius ρ (the initial value when `learn_rho=True`). `None` takes
            the rule's default (SAM 0.05, ASAM 0.5).
        sam_scope (`str`, defaults to `"global"`):
            `"global"`: ε from the gradient of the whole global batch (all accumulation
            micro-batches, all ranks), so N ranks equal one rank with N times the batch.
            `"local"`: each rank and micro-batch perturbs with its own gradient
            (m-sharpness; no all-reduce in the first pass; not under FSDP2).
        asam_eta (`float`, defaults to `0.01`):
            η in ASAM's T = |θ| + η.

        > SAM policy (on which steps SAM runs)

        sam_policy (`str`, defaults to `"every"`):
            Which optimizer steps take SAM (with any `sam_variant`); the others are plain steps on the
            first pass's gradient, one pass instead of two (`lets_hf.policies`). `"every"`: all of them.
            `"ae-sam"`: where ‖g‖² ≥ μ + c_t·σ, μ and σ² running estimates of ‖g‖²'s mean and
            variance (AE-SAM). `"looksam"`: every `looksam_k`-th step; the steps between reuse the last
            SAM gradient's component orthogonal to g (LookSAM; one more parameter-sized buffer).
            `"random"`: with probability `random_sam_p` (SS-SAM). With `learn_rho`, ρ is updated on SAM
            steps only. `"ae-sam"` and `"looksam"` need `sam_scope="global"`; BiSAM takes `"random"`.
        ae_sam_decay (`float`, defaults to `0.9`):
            δ of AE-SAM's running estimates: μ ← δ·μ + (1 − δ)·‖g‖², σ² ← δ·σ² + (1 − δ)·(‖g‖² − μ)².
        ae_sam_c_start, ae_sam_c_end (`float`, defaults to `1.0` and `-1.0`):
            AE-SAM's threshold coefficient c_t goes linearly from `ae_sam_c_start` at the first step
            to `ae_sam_c_end` at the last: few SAM steps early, most late (about half overall).
        looksam_k (`int`, defaults to `5`):
            LookSAM takes SAM every k optimizer steps.
        looksam_alpha (`float`, defaults to `0.7`):
            α in LookSAM's g + α·(‖g‖/‖g_v‖)·g_v on the steps between.
        random_sam_p (`float`, defaults to `0.5`):
            Probability that a step takes SAM under `"random"`.
        random_sam_seed (`int`, defaults to `42`):
            Seed of `"random"`'s draws: the draw of step t depends on (seed, t) alone, so every rank
            draws the same and a resumed run draws what the uninterrupted one would.

        > Learned radius (the upper level: LETS)

        learn_rho (`bool`, defaults to `False`):
            Learn ρ by hypergradient descent on the upper-level objective (`rho_objective`).
        rho_estimator (`str`, defaults to `"one-step"`):
            How ∂θ/∂ρ is estimated. `"one-step"`: through the last descent step only (the paper's,
            u_t = −η·c·J_P·H·d_t). `"trace"`: a forward trace of the total derivative over all
            steps, h ← μ·(I − η·c·J_P·H)·h + u_t with μ = `rho_trace_decay` (RTHO / MARTHE);
            updated every step, one more parameter-sized buffer.
            `"antithetic"`: horizon-free, no hypergradient: windows of `rho_update_interval` steps
            alternate ρ·e^{+δ} and ρ·e^{−δ} (pairs +−, −+, ...), the validation loss is measured on the
            same `rho_antithetic_batches` batches at every window boundary, and
            (Δ_{+δ} − Δ_{−δ})/(2δ), the windows' loss changes compared, estimates dL_val/d log ρ over
            the window (SPSA / PES). Forward passes only, no buffer; needs `rho_update_space="log"`.
        rho_trace_decay (`float`, defaults to `0.9`):
            μ of the `"trace"` estimator, in [0, 1): the trace remembers about 1/(1 − μ) steps.
            μ = 0 is the one-step estimator.
        rho_antithetic_delta (`float`, defaults to `0.5`):
            δ of the `"antithetic"` estimator: its windows run at ρ·e^{±δ}.
        rho_antithetic_batches (`int`, defaults to `4`):
            Validation batches (of `rho_batch_size`) the `"antithetic"` estimator evaluates, in eval
            mode, at every window boundary: the same batches every time.
        rho_objective (`str`, defaults to `"squared-gap"`):
            The upper-level objective F(ρ). `"squared-gap"`: ½(L_val − L_train)² (the paper's),
            dF/dρ = (L_val − L_train)·⟨∇L_val − ∇L_train, ∂θ/∂ρ⟩. `"val-loss"`: L_val, the classic
            hyperparameter objective, dF/dρ = ⟨∇L_val, ∂θ/∂ρ⟩.
        rho_train_batch (`str`, defaults to `"next"`):
            The batch whose loss is L_train in the squared gap at θ_{t+1}. `"next"` (the paper's): the
            batch about to be stepped on, from its first pass: in the first epoch no step has seen it yet,
            so the gap is zero in expectation until the data repeats. `"last"`: B_t, the batch θ_{t+1} was
            just stepped on, re-evaluated right after that step (one more forward and backward per ρ
            update; its loss and inner products are kept for the update at the start of step t+1): a gap
            from the first step on. Needs `sam_scope="global"`, the one-step or trace estimator and
            `sam_policy="every"`.
        rho_val_batch (`str`, defaults to `"held-out"`):
            The batch whose loss is L_val. `"held-out"` (the paper's): a batch of `rho_dataset` or of the
            `rho_val_fraction` split of the train set, which is then never trained on. `"next"`: the next
            training batch, from its first pass (not yet trained on in the first epoch, once less than the
            last batch later): nothing is held out and no validation pass runs. Needs
            `rho_train_batch="last"` (with "next" both losses would be the same batch's).
        rho_update_space (`str`, defaults to `"linear"`):
            `"linear"`: the ρ optimizer steps ρ (the paper's). `"log"`: it steps log ρ with the
            hypergradient ρ·dF/dρ, so `rho_lr` is a relative change and one value serves any ρ₀.
        rho_lr (`float` or `None`, defaults to `None`):
            Step size of the ρ optimizer (with `"adam"`: about the largest change of ρ, or of log ρ
            in the log space, per update). `None`: in the linear space 2% of the initial ρ, so one
            default fits rules whose radii differ by orders of magnitude (SAM 1e-3, ASAM 1e-2,
            per-coordinate LightSAM 2e-7); in the log space 0.02 (2% of ρ per update).
        rho_optimizer (`str`, defaults to `"adam"`):
            `"adam"` (scale-free Adam on the scalar) or `"sgd"` (plain descent).
        rho_step_rule (`str`, defaults to `"optimizer"`):
            `"optimizer"`: the ρ optimizer steps on every update (the paper's). `"evidence"`: ρ moves only
            when the hypergradients since its last move agree on a direction: after at least
            `rho_evidence_min_updates` of them, once the t-statistic of their mean reaches
            `rho_evidence_threshold`, ρ is divided or multiplied by `rho_evidence_factor` (`rho_optimizer`
            and `rho_lr` are then unused; `lets_hf.evidence` gives the false-move rate).
        rho_evidence_threshold, rho_evidence_min_updates, rho_evidence_factor (defaults to `3.0`, `100`, `2.0`):
            The evidence rule's |t| to move, updates before the first test, and the move's factor.
        rho_min, rho_max (`float`, defaults to `0.0` and `10.0`):
            ρ is projected onto [rho_min, rho_max] after each update.
        rho_hessian (`str`, defaults to `"diagonal"`):
            Hessian in the hypergradient: `"diagonal"` (diag(g̃²), the paper's, free),
            `"exact"` (Hessian-vector product, one extra backward; not under FSDP2) or `"identity"`.
        rho_update_interval (`int`, defaults to `1`):
            Update ρ every k optimizer steps; only those steps pay the validation pass.
        rho_batch_size (`int` or `None`, defaults to `None`):
            Validation batch per device for the upper level; `None` uses
            `per_device_train_batch_size`.
        rho_val_fraction (`float`, defaults to `0.1`):
            Fraction of `train_dataset` held out (and never trained on) as the upper-level
            validation set when no `rho_dataset` is given to the trainer.
        rho_seed (`int`, defaults to `42`):
            Seed of that split, of the validation batch order and of the validation passes' own
            random stream (dropout), which leaves the training passes' random draws untouched.
        rho_diagnostics_window (`int`, defaults to `20`):
            Number of recent ρ updates over which the log's running statistics are taken: the mean
            and std of the gap and of the inner product, the hypergradient's signal-to-noise ratio
            |mean|/std and its sign agreement (share of updates with the sign of the mean).
        rho_signal_probes (`list[float]`, defaults to `[]`):
            Diagnostics for choosing an estimator: beside the estimator's own ∂θ/∂ρ, a trace with each of
            these decays (0: the one-step estimator) follows every step, and at every ρ update each one's
            dF/dρ under both objectives, on the same validation batch, is logged as
            `rho_probe_mu<μ>_squared_gap` and `rho_probe_mu<μ>_val_loss`. ρ never reads them: a frozen run
            (`rho_optimizer="sgd"`, a negligible `rho_lr`) maps every estimator's signal at one ρ. One
            parameter-sized buffer each (two for μ > 0); needs the `"one-step"` or `"trace"` estimator, a
            `"diagonal"` or `"identity"` Hessian and `sam_policy="every"`.

        > LightSAM / BiSAM / BSAM

        bisam_surrogate (`str`, defaults to `"log"`):
            BiSAM's lower bound φ of the 0-1 loss in its first pass: `"log"`
            (φ(x) = 1 − log(1 + e^{γ−x}), γ = log(e − 1)) or `"tanh"` (φ(x) = tanh(αx)).
            BiSAM needs class labels: regression tasks (STS-B) are rejected at the first step.
        bisam_mu (`float`, defaults to `1.0`):
            μ in BiSAM's Q = mean_i logsumexp_j(μ·φ(logit_ij − logit_{i,y_i})).
        bisam_alpha (`float`, defaults to `0.1`):
            α in φ(x) = tanh(αx) (the `"tanh"` surrogate only).
        bsam_rho_min (`float`, defaults to `0.05`):
            BSAM's min-side radius at the peak learning rate; it follows the schedule,
            ρ_min,t = bsam_rho_min·lr_t/lr_peak. ρ (learned or not) is the max-side radius.
            BSAM needs `sam_scope="global"`.

        > Safety

        nonfinite_patience (`int`, defaults to `5`):
            An optimizer step whose loss or first-pass gradient is NaN or inf is skipped for θ
            and ρ (and a ρ update with a non-finite gap or hypergradient is skipped for ρ).
            After this many consecutive skipped steps training stops with an error that names
            the step, the last finite loss and the likely causes. `0`: never stop, keep skipping.
        save_on_sigterm (`bool`, defaults to `False`):
            On SIGTERM (what SLURM sends before it kills a job) save a complete checkpoint at the
            next optimizer-step boundary, whatever `save_strategy` says, and stop: `train` raises
            `lets_hf.preemption.TrainingPreempted`, which names the checkpoint. The `lets-hf`
            command turns it on and then exits 75 (EX_TEMPFAIL), for a job script to requeue.

        Default ρ of these rules: BiSAM and BSAM 0.05 (SAM's), `lightsam-adagrad-norm`
        0.05 (its first ε is SAM's, then shrinks as gradients accumulate),
        `lightsam-adagrad` and `lightsam-adam` 1e-5 (a per-coordinate size, like an Adam
        learning rate: ‖ε‖ ≈ ρ·√(number of parameters)). LightSAM's descent optimizers are
        in `lets_hf.optim`; `lightsam-adam`'s rule shares `adam_beta2` with its AdamW descent.
    """

    sam_variant: str = field(
        default="sam",
        metadata={"help": "Perturbation rule: 'none' (plain Trainer), 'sam', 'asam', or a registered rule."},
    )
    rho: float | None = field(
        default=None,
        metadata={"help": "Perturbation radius (initial value if learn_rho). Default: the rule's own (SAM 0.05, ASAM 0.5)."},
    )
    sam_scope: str = field(
        default="global",
        metadata={
            "help": "'global': perturb with the whole global batch's gradient; 'local': per rank and micro-batch "
            "(not under FSDP2)."
        },
    )
    asam_eta: float = field(default=0.01, metadata={"help": "ASAM's η in T = |θ| + η."})
    sam_policy: str = field(
        default="every",
        metadata={
            "help": "Which steps take SAM (any rule): 'every', 'ae-sam' (where ‖g‖² is high for its running "
            "mean and variance), 'looksam' (every looksam_k-th step, reusing its gradient between) or 'random' "
            "(probability random_sam_p); the others are plain steps (one pass)."
        },
    )
    ae_sam_decay: float = field(
        default=0.9, metadata={"help": "δ of AE-SAM's running mean and variance of ‖g‖² (EMA), in (0, 1)."}
    )
    ae_sam_c_start: float = field(
        default=1.0, metadata={"help": "AE-SAM's threshold coefficient c_t (SAM iff ‖g‖² ≥ μ + c_t·σ) at the first step."}
    )
    ae_sam_c_end: float = field(
        default=-1.0, metadata={"help": "AE-SAM's c_t at the last step (linear in between)."}
    )
    looksam_k: int = field(default=5, metadata={"help": "LookSAM takes SAM every k optimizer steps."})
    looksam_alpha: float = field(
        default=0.7, metadata={"help": "LookSAM's α in g + α·(‖g‖/‖g_v‖)·g_v on the steps between SAM steps."}
    )
    random_sam_p: float = field(default=0.5, metadata={"help": "Probability of a SAM step under sam_policy='random'."})
    random_sam_seed: int = field(
        default=42, metadata={"help": "Seed of sam_policy='random' (step t's draw depends on the seed and t alone)."}
    )
    learn_rho: bool = field(
        default=False, metadata={"help": "Learn ρ by hypergradient descent on the squared generalization gap (LETS)."}
    )
    rho_estimator: str = field(
        default="one-step",
        metadata={
            "help": "ρ's signal: 'one-step' (∂θ/∂ρ through the last step, the paper's), 'trace' (forward trace of "
            "∂θ/∂ρ over all steps, decay rho_trace_decay) or 'antithetic' (windows at ρ·e^(±δ), needs log space)."
        },
    )
    rho_trace_decay: float = field(
        default=0.9, metadata={"help": "μ of the 'trace' estimator in [0, 1): it remembers ~1/(1-μ) steps."}
    )
    rho_antithetic_delta: float = field(
        default=0.5, metadata={"help": "δ of the 'antithetic' estimator: its windows alternate ρ·e^(+δ) and ρ·e^(-δ)."}
    )
    rho_antithetic_batches: int = field(
        default=4, metadata={"help": "Validation batches the 'antithetic' estimator evaluates at each window boundary."}
    )
    rho_objective: str = field(
        default="squared-gap",
        metadata={"help": "Upper-level objective: 'squared-gap' (½(L_val - L_train)², the paper's) or 'val-loss'."},
    )
    rho_train_batch: str = field(
        default="next",
        metadata={
            "help": "L_train of the squared gap: 'next' (the batch about to be stepped on, the paper's: no gap in "
            "the first epoch) or 'last' (the batch just stepped on, re-evaluated: one more pass per ρ update)."
        },
    )
    rho_val_batch: str = field(
        default="held-out",
        metadata={
            "help": "L_val: 'held-out' (a batch held out from training, the paper's) or 'next' (the next training "
            "batch's first pass: nothing held out; needs rho_train_batch='last')."
        },
    )
    rho_update_space: str = field(
        default="linear",
        metadata={"help": "'linear': step ρ (the paper's); 'log': step log ρ (rho_lr is then a relative change)."},
    )
    rho_lr: float | None = field(
        default=None,
        metadata={
            "help": "Step size of the ρ optimizer. Default: 2%% of the initial ρ per update (1e-3 for SAM's 0.05); "
            "in the log space 0.02."
        },
    )
    rho_optimizer: str = field(default="adam", metadata={"help": "ρ optimizer: 'adam' (scale-free) or 'sgd'."})
    rho_step_rule: str = field(
        default="optimizer",
        metadata={
            "help": "'optimizer': the ρ optimizer steps on every update (the paper's); 'evidence': ρ moves by "
            "rho_evidence_factor only when the hypergradients since its last move are significant."
        },
    )
    rho_evidence_threshold: float = field(
        default=3.0, metadata={"help": "Evidence rule: the |t| of the hypergradients' mean that moves ρ."}
    )
    rho_evidence_min_updates: int = field(
        default=100, metadata={"help": "Evidence rule: ρ updates since the last move before the first test."}
    )
    rho_evidence_factor: float = field(
        default=2.0, metadata={"help": "Evidence rule: a move multiplies or divides ρ by this factor."}
    )
    rho_min: float = field(default=0.0, metadata={"help": "Lower bound of ρ (projection)."})
    rho_max: float = field(default=10.0, metadata={"help": "Upper bound of ρ (projection)."})
    rho_hessian: str = field(
        default="diagonal",
        metadata={
            "help": "Hessian in the hypergradient: 'diagonal' (squared gradients), 'exact' (HVP; not under FSDP2), "
            "'identity'."
        },
    )
    rho_update_interval: int = field(default=1, metadata={"help": "Update ρ every k optimizer steps."})
    rho_batch_size: int | None = field(
        default=None, metadata={"help": "Validation batch per device for ρ; default per_device_train_batch_size."}
    )
    rho_val_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of train_dataset held out for the ρ validation loss when no rho_dataset is given."},
    )
    rho_seed: int = field(
        default=42, metadata={"help": "Seed of the ρ validation split, batch order and validation passes' dropout."}
    )
    rho_diagnostics_window: int = field(
        default=20, metadata={"help": "ρ updates over which the logged hypergradient statistics are taken."}
    )
    rho_signal_probes: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Diagnostics: ∂θ/∂ρ traces with these decays (0: one-step) follow every step beside the "
            "estimator's; each one's dF/dρ under both objectives is logged at every ρ update (ρ never reads them)."
        },
    )
    bisam_surrogate: str = field(
        default="log",
        metadata={"help": "BiSAM's lower bound of the 0-1 loss: 'log' (1 - log(1 + e^(γ-x))) or 'tanh' (tanh(αx))."},
    )
    bisam_mu: float = field(default=1.0, metadata={"help": "BiSAM's μ in logsumexp_j(μ·φ(F_ij))."})
    bisam_alpha: float = field(default=0.1, metadata={"help": "BiSAM's α in φ(x) = tanh(αx) (tanh surrogate only)."})
    bsam_rho_min: float = field(
        default=0.05,
        metadata={"help": "BSAM's min-side radius at the peak learning rate; it follows the lr schedule."},
    )
    nonfinite_patience: int = field(
        default=5,
        metadata={
            "help": "Steps with a NaN/inf loss or gradient are skipped; stop with an error after this many in a row "
            "(0: never stop)."
        },
    )
    save_on_sigterm: bool = field(
        default=False,
        metadata={
            "help": "On SIGTERM, save a complete checkpoint at the next optimizer-step boundary and stop; lets-hf "
            "turns it on and then exits 75 for the job script to requeue (--save_on_sigterm false: SIGTERM kills)."
        },
    )

    def __post_init__(self):
        """Validate before and after the other base's own `__post_init__` (when that base comes later in the
        MRO; otherwise the trainer validates these fields when it is built)."""
        self._check_before_training_arguments()
        if hasattr(super(), "__post_init__"):  # alone, for `LETSEngine` in a plain loop, it has no other base
            super().__post_init__()
        self.check_lets_arguments()

    def check_lets_arguments(self) -> None:
        """Raise `UsageError` for LETS settings that cannot run; idempotent."""
        self._check_before_training_arguments()
        self._check_after_training_arguments()

    def _check_before_training_arguments(self) -> None:
        self._run_bf16_on_cpu()
        if self.sam_variant != "none" and getattr(self, "deepspeed", None):
            raise UsageError(
                "LETSTrainer does not support DeepSpeed yet (its engine owns the backward and the gradient buffers "
                f"that the perturbation needs): {unset('deepspeed', None)} and launch with DDP "
                "(accelerate launch --multi_gpu)."
            )
        _check_choice("bisam_surrogate", self.bisam_surrogate, BISAM_SURROGATES)
        if self.bisam_mu <= 0 or self.bisam_alpha <= 0:
            raise UsageError(
                f"{setting('bisam_mu')} and {setting('bisam_alpha')} must be > 0, got {self.bisam_mu} and "
                f"{self.bisam_alpha}."
            )
        if self.bsam_rho_min < 0:
            raise UsageError(f"{setting('bsam_rho_min')} must be >= 0, got {self.bsam_rho_min}.")
        if self.sam_variant == "bsam" and self.sam_scope == "local":
            raise UsageError(
                f"{setting('sam_variant', 'bsam')} needs {setting('sam_scope', 'global')}: its min-side pass reuses "
                "the cached global batch, which the local scope does not keep. Use "
                f"{setting('sam_scope', 'global')} (or another rule for m-sharpness)."
            )

    def _run_bf16_on_cpu(self) -> None:
        """Without an accelerator, TrainingArguments refuses bf16 unless `use_cpu` is set, though the CPU is the only
        device there is: set it where the CPU computes in bfloat16, and say what to change where it does not."""
        # None: the other base decides later, and TRL's configs decide bf16=True where fp16 is off.
        requested = [name for name in ("bf16", "bf16_full_eval") if getattr(self, name, False) in (True, None)]
        if not requested or self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available():
            return
        if _has_accelerator(use_cpu=False):
            return  # a GPU without bf16: TrainingArguments says so
        if not is_torch_bf16_available_on_device("cpu"):
            raise UsageError(
                f"{setting(requested[0], True)} needs a GPU or a CPU that computes in bfloat16, and this machine has "
                f"neither: {' and '.join(unset(name) for name in requested)}."
            )
        logger.info("bf16 without a GPU: this run uses the CPU (use_cpu=True), which computes in bfloat16.")
        self.use_cpu = True

    def _check_after_training_arguments(self) -> None:
        variants = ["none", *available_rules()]
        if self.sam_variant not in variants:
            raise UsageError(f"Unknown {setting('sam_variant')} {self.sam_variant!r}: choose one of {variants}.")
        _check_choice("sam_scope", self.sam_scope, SCOPES)
        self._check_sam_policy()
        _check_choice("rho_optimizer", self.rho_optimizer, RHO_OPTIMIZERS)
        _check_choice("rho_step_rule", self.rho_step_rule, RHO_STEP_RULES)
        self._check_evidence_rule()
        _check_choice("rho_hessian", self.rho_hessian, RHO_HESSIANS)
        _check_choice("rho_estimator", self.rho_estimator, RHO_ESTIMATORS)
        _check_choice("rho_objective", self.rho_objective, RHO_OBJECTIVES)
        _check_choice("rho_train_batch", self.rho_train_batch, RHO_TRAIN_BATCHES)
        _check_choice("rho_val_batch", self.rho_val_batch, RHO_VAL_BATCHES)
        self._check_gap_batches()
        _check_choice("rho_update_space", self.rho_update_space, RHO_UPDATE_SPACES)
        if not 0 <= self.rho_trace_decay < 1:
            raise UsageError(
                f"{setting('rho_trace_decay')} must be in [0, 1), got {self.rho_trace_decay} (1 would never forget a "
                "step, and the trace would grow without bound)."
            )
        if self.rho_estimator == "antithetic" and self.rho_update_space != "log":
            raise UsageError(
                f"{setting('rho_estimator', 'antithetic')} estimates the derivative with respect to log ρ: use "
                f"{setting('rho_update_space', 'log')}."
            )
        if self.rho_antithetic_delta <= 0 or self.rho_antithetic_batches < 1:
            raise UsageError(
                f"{setting('rho_antithetic_delta')} must be > 0 and {setting('rho_antithetic_batches')} >= 1, got "
                f"{self.rho_antithetic_delta} and {self.rho_antithetic_batches}."
            )
        if self.rho_diagnostics_window < 2:
            raise UsageError(
                f"{setting('rho_diagnostics_window')} must be >= 2 (a std needs two updates), got "
                f"{self.rho_diagnostics_window}."
            )
        self._check_signal_probes()
        for name in ("rho", "rho_lr", "rho_min", "rho_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{setting(name)} must be a finite number, got {value}.")
        if self.rho is not None and self.rho <= 0:
            raise UsageError(
                f"{setting('rho')} must be > 0, got {self.rho}; for training without perturbation use "
                f"{setting('sam_variant', 'none')}."
            )
        if self.learn_rho and self.sam_variant == "none":
            raise UsageError(
                f"{setting('learn_rho', True)} needs a perturbation, which {setting('sam_variant', 'none')} turns "
                f"off: use a rule such as {setting('sam_variant', 'sam')}."
            )
        if self.learn_rho and self.rho_hessian == "exact" and self.sam_scope == "local":
            raise UsageError(
                f"{setting('rho_hessian', 'exact')} needs {setting('sam_scope', 'global')}; use "
                f"{setting('rho_hessian', 'diagonal')} or {setting('rho_hessian', 'identity')} with "
                f"{setting('sam_scope', 'local')}."
            )
        if not 0 <= self.rho_min < self.rho_max:
            raise UsageError(
                f"Need 0 <= rho_min < rho_max, got {setting('rho_min', self.rho_min)}, "
                f"{setting('rho_max', self.rho_max)}."
            )
        if self.learn_rho and self.rho is not None:
            check_rho_within_bounds(self.rho, self.rho_min, self.rho_max)
        if self.rho_lr is not None and self.rho_lr <= 0:
            raise UsageError(f"{setting('rho_lr')} must be > 0, got {self.rho_lr}.")
        if self.rho_update_interval < 1:
            raise UsageError(f"{setting('rho_update_interval')} must be >= 1, got {self.rho_update_interval}.")
        if self.rho_batch_size is not None and self.rho_batch_size < 1:
            raise UsageError(f"{setting('rho_batch_size')} must be >= 1, got {self.rho_batch_size}.")
        if not 0 < self.rho_val_fraction < 1:
            raise UsageError(f"{setting('rho_val_fraction')} must be in (0, 1), got {self.rho_val_fraction}.")
        if self.nonfinite_patience < 0:
            raise UsageError(
                f"{setting('nonfinite_patience')} must be >= 0 (0: never stop), got {self.nonfinite_patience}."
            )
        fsdp_version = (getattr(self, "fsdp_plugin_args", None) or {}).get("fsdp_version")
        if self.sam_variant != "none" and fsdp_version == 1:
            raise UsageError(
                "LETSTrainer does not support FSDP1 (its flat parameters hide the per-parameter gradients the "
                f"perturbation needs). Use FSDP2: {setting('fsdp_config', {'version': 2})} (the default)."
            )
        if self.sam_variant != "none" and fsdp_version == 2:
            check_fsdp2_settings(self)
        self._check_launched_processes_join()
        if getattr(self, "fp16", False) and not _has_accelerator(self.use_cpu):
            raise UsageError(
                f"{setting('fp16')} needs a GPU (its loss scaling runs on CUDA), and this run is on the CPU, where it "
                f"would change nothing: {unset('fp16')}, or use {setting('bf16', True)} where the CPU supports it."
            )


    def _check_launched_processes_join(self) -> None:
        """Under torchrun on a machine without GPUs, TrainingArguments forms a process group only with `use_cpu`:
        without it each launched process would train alone, every one writing to the same output_dir."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        any_accelerator = _has_accelerator(use_cpu=False) or torch.accelerator.is_available() or is_torch_xla_available()
        if launched > 1 and getattr(self, "use_cpu", True) is False and not any_accelerator:
            raise UsageError(
                f"This process is one of {launched} launched together (WORLD_SIZE={launched}), and this machine has "
                f"no GPU: without {setting('use_cpu', True)} TrainingArguments forms no process group, and each "
                f"process would train alone, all writing to the same output_dir. Set {setting('use_cpu', True)} "
                "(DDP over gloo on the CPU), or launch one process."
            )

    def _check_gap_batches(self) -> None:
        """`rho_val_batch="next"` needs the other loss on another batch; `rho_train_batch="last"` re-evaluates the
        whole global batch just stepped on, with ∂θ/∂ρ through it."""
        if self.rho_val_batch == "next" and self.learn_rho:
            _refuse_unless(setting("rho_val_batch", "next"), [(self.rho_train_batch != "last",
                                                               setting("rho_train_batch", "last"))])
        if self.rho_train_batch != "last" or not self.learn_rho:
            return
        _refuse_unless(setting("rho_train_batch", "last"),
                       [(self.sam_scope == "local", setting("sam_scope", "global")), *self._needs_of_every_step_tracked()])

    def _needs_of_every_step_tracked(self) -> list[tuple[bool, str]]:
        """(broken, what to set) for a feature that follows ∂θ/∂ρ through every step, each one a SAM step."""
        return [(self.rho_estimator == "antithetic", f"{setting('rho_estimator', 'one-step')} or 'trace'"),
                (self.sam_policy != "every", setting("sam_policy", "every"))]

    def _check_signal_probes(self) -> None:
        """The probes follow the estimator's own steps and passes: only where those carry a ∂θ/∂ρ on every step."""
        if not self.rho_signal_probes:
            return
        bad = [mu for mu in self.rho_signal_probes if not 0 <= mu < 1]
        if bad:
            raise UsageError(f"{setting('rho_signal_probes')} are trace decays in [0, 1), got {bad}.")
        _refuse_unless(setting("rho_signal_probes"), [
            (not self.learn_rho, setting("learn_rho", True)), *self._needs_of_every_step_tracked(),
            (self.rho_hessian == "exact", f"{setting('rho_hessian', 'diagonal')} or 'identity'"),
        ])

    def _check_evidence_rule(self) -> None:
        if self.rho_evidence_threshold <= 0 or self.rho_evidence_min_updates < 2 or self.rho_evidence_factor <= 1:
            raise UsageError(
                f"{setting('rho_evidence_threshold')} must be > 0, {setting('rho_evidence_min_updates')} >= 2 (a "
                f"t-statistic needs two values) and {setting('rho_evidence_factor')} > 1, got "
                f"{self.rho_evidence_threshold}, {self.rho_evidence_min_updates} and {self.rho_evidence_factor}."
            )
        if (self.learn_rho and self.rho_step_rule == "evidence" and self.rho_estimator == "trace"
                and self.rho_trace_decay >= 0.99):
            logger.warning(
                f"{setting('rho_step_rule', 'evidence')} with {setting('rho_trace_decay', self.rho_trace_decay)}: "
                "the trace's hypergradients stay correlated over hundreds of updates, too few independent ones for "
                "the rule's test within a run (ρ moved on 45 of 100 such noise streams); use a decay below 0.99."
            )

    def _check_sam_policy(self) -> None:
        """The policy's own fields, and the rules and scopes where a policy cannot run exactly."""
        _check_choice("sam_policy", self.sam_policy, SAM_POLICIES)
        if not 0 < self.ae_sam_decay < 1:
            raise UsageError(f"{setting('ae_sam_decay')} must be in (0, 1), got {self.ae_sam_decay}.")
        if self.looksam_k < 1 or self.looksam_alpha < 0:
            raise UsageError(
                f"{setting('looksam_k')} must be >= 1 and {setting('looksam_alpha')} >= 0, got {self.looksam_k} and "
                f"{self.looksam_alpha}."
            )
        if not 0 <= self.random_sam_p <= 1 or self.random_sam_seed < 0:
            raise UsageError(
                f"{setting('random_sam_p')} must be in [0, 1] and {setting('random_sam_seed')} >= 0, got "
                f"{self.random_sam_p} and {self.random_sam_seed}."
            )
        policy = self.sam_policy
        if policy == "every":
            return
        if self.sam_variant == "none":
            raise UsageError(
                f"{setting('sam_policy', policy)} chooses the steps that take SAM, and {setting('sam_variant', 'none')} "
                f"takes none: use a rule (e.g. {setting('sam_variant', 'sam')}), or {setting('sam_policy', 'every')}."
            )
        if policy in ("ae-sam", "looksam") and self.sam_scope == "local":
            raise UsageError(
                f"{setting('sam_policy', policy)} needs {setting('sam_scope', 'global')}: "
                + ("its decision reads the whole step's gradient norm, which the local scope does not have before it "
                   "perturbs the first micro-batch" if policy == "ae-sam" else
                   "its reused component is taken against the whole step's gradient, which the local scope never forms")
                + f". Use {setting('sam_scope', 'global')}, or {setting('sam_policy', 'random')} for m-sharpness."
            )
        if policy in ("ae-sam", "looksam") and self.sam_variant == "bisam":
            raise UsageError(
                f"{setting('sam_policy', policy)} cannot run with {setting('sam_variant', 'bisam')}: BiSAM's first pass "
                "is the gradient of its surrogate, not of the loss, so a plain step would need a second pass anyway "
                + ("(AE-SAM decides after the first pass)" if policy == "ae-sam" else
                   "(and LookSAM's reused component needs the loss's gradient at θ)")
                + f". Use {setting('sam_policy', 'random')}, which decides before the first pass, or another rule."
            )
        if (policy == "looksam" and self.looksam_k > 1 and self.learn_rho and self.rho_estimator == "one-step"):
            raise UsageError(
                f"{setting('learn_rho', True)} with {setting('rho_estimator', 'one-step')} takes ∂θ/∂ρ through the "
                "last step only, which is zero through a plain step; under "
                f"{setting('sam_policy', 'looksam')} no SAM step follows another, so ρ would never be updated. Use "
                f"{setting('rho_estimator', 'trace')} (which carries ∂θ/∂ρ across plain steps) or "
                f"{setting('rho_estimator', 'antithetic')}, or another policy."
            )


def _refuse_unless(feature: str, needs: list[tuple[bool, str]]) -> None:
    """Refuses `feature` when a condition of `needs` (broken, what to set) is broken, naming every setting to change."""
    missing = [need for broken, need in needs if broken]
    if missing:
        raise UsageError(f"{feature} needs " + ", ".join(missing) + ".")


#: `LETSArguments`' fields in the sections of its docstring, as `lets-hf <task> --help` lists them.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "Perturbation": ("sam_variant", "rho", "sam_scope", "asam_eta"),
    "SAM policy (on which steps SAM runs)": (
        "sam_policy", "ae_sam_decay", "ae_sam_c_start", "ae_sam_c_end", "looksam_k", "looksam_alpha", "random_sam_p",
        "random_sam_seed",
    ),
    "Learned radius (LETS)": (
        "learn_rho", "rho_estimator", "rho_trace_decay", "rho_antithetic_delta", "rho_antithetic_batches",
        "rho_objective", "rho_train_batch", "rho_val_batch", "rho_update_space", "rho_lr", "rho_optimizer",
        "rho_step_rule", "rho_evidence_threshold",
        "rho_evidence_min_updates", "rho_evidence_factor", "rho_min", "rho_max", "rho_hessian",
        "rho_update_interval", "rho_batch_size", "rho_val_fraction", "rho_seed", "rho_diagnostics_window",
        "rho_signal_probes",
    ),
    "LightSAM / BiSAM / BSAM": ("bisam_surrogate", "bisam_mu", "bisam_alpha", "bsam_rho_min"),
    "Safety": ("nonfinite_patience", "save_on_sigterm"),
}


@dataclass
class LETSConfig(LETSArguments, TrainingArguments):
    """Configuration of [`LETSTrainer`]: every `TrainingArguments` field, plus the LETS fields of [`LETSArguments`]."""


@dataclass
class LETSSeq2SeqConfig(LETSArguments, Seq2SeqTrainingArguments):
    """Configuration of [`LETSSeq2SeqTrainer`]: `Seq2SeqTrainingArguments` (generation in evaluation) plus LETS."""


def check_rho_within_bounds(rho: float, rho_min: float, rho_max: float) -> None:
    """A learned ρ starts inside its projection bounds (otherwise the first update jumps to a bound)."""
    if not rho_min <= rho <= rho_max:
        raise UsageError(
            f"With {setting('learn_rho')} the initial {setting('rho')} ({rho}) must lie in "
            f"[{setting('rho_min')}, {setting('rho_max')}] = [{rho_min}, {rho_max}]. Change {setting('rho')}, or "
            "widen the bounds."
        )


def check_fsdp2_settings(args) -> None:
    """What LETS supports under FSDP2: the global scope, and the diagonal or identity Hessian for learned ρ."""
    if args.sam_scope == "local":
        raise UsageError(
            f"{setting('sam_scope', 'local')} is not supported under FSDP2: each micro-batch would need its own full, "
            "unsharded gradient on every rank, which is the memory FSDP2 saves. Use "
            f"{setting('sam_scope', 'global')}, or DDP for m-sharpness."
        )
    if args.learn_rho and args.rho_hessian == "exact":
        raise UsageError(
            f"{setting('rho_hessian', 'exact')} is not supported under FSDP2 (its double backward cannot reach "
            f"parameters that FSDP2 all-gathers outside autograd). Use {setting('rho_hessian', 'diagonal')} (the "
            f"paper's) or {setting('rho_hessian', 'identity')}, or DDP."
        )


def _has_accelerator(use_cpu: bool) -> bool:
    if use_cpu:
        return False
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"Unknown {setting(name)} {value!r}: choose one of {list(choices)}.")
