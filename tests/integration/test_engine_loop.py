"""`LETSEngine` in a plain loop (no Trainer, `tests/loop.py`) equals `LETSTrainer`: same real 🤗 heads, data
order and settings; θ, ρ and the optimizer state equal to float reduction order, for every rule and Hessian
mode, with and without accumulation, with and without an Accelerator. (2 processes and FSDP2:
`tests/distributed/test_loop.py`.)"""

import pytest
import torch
from accelerate import Accelerator

from lets_hf import LETSArguments
from lets_hf.engine import LETSEngine
from lets_hf.errors import UsageError
from tests.heads import GLOBAL_BATCH, build_model, train
from tests.loop import plain_loop

#: name -> (head, case of tests.heads, LETS fields): every rule the loop can run, ρ fixed and learned
RUNS = {
    "bert-classification/sam": ("bert-classification", "sam", {}),
    "bert-classification/asam": ("bert-classification", "sam", {"sam_variant": "asam"}),
    "bert-classification/bsam": ("bert-classification", "sam", {"sam_variant": "bsam"}),
    "bert-classification/lets-sam": ("bert-classification", "lets-sam", {}),
    "bert-classification/lets-sam-exact": ("bert-classification", "lets-sam", {"rho_hessian": "exact"}),
    "bert-classification/lets-asam": ("bert-classification", "lets-sam", {"sam_variant": "asam", "rho_lr": 100.0}),
    "bert-regression/lets-sam": ("bert-regression", "lets-sam", {}),
    "gpt2/lets-sam": ("gpt2", "lets-sam", {}),
    "bart/lets-sam": ("bart", "lets-sam", {}),
}
#: A plain loop's loss is each micro-batch's mean: it equals Trainer's token mean over the step only without
#: accumulation (GPT-2, BART).
TOKEN_HEADS = ("gpt2", "bart")


def assert_same_run(loop: dict, trainer: dict, learned: bool) -> None:
    torch.testing.assert_close(loop["theta"], trainer["theta"], rtol=1e-10, atol=1e-12)
    assert loop["rho"] == pytest.approx(trainer["rho"], rel=1e-9)
    for mine, theirs in zip(loop["optimizer_state"], trainer["optimizer_state"], strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-10, atol=1e-12)
    if learned:
        assert abs(loop["rho"] - 0.05) > 1e-3  # ρ moved: the comparison covers the hypergradient


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("run", RUNS)
def test_plain_loop_equals_lets_trainer(tmp_path, one_thread, run, accumulation):
    head, case, fields = RUNS[run]
    if head in TOKEN_HEADS and accumulation > 1:
        pytest.skip("a token loss averaged per micro-batch differs from Trainer's token mean over the step")
    batch = GLOBAL_BATCH // accumulation
    trainer = train(head, case, str(tmp_path), batch=batch, accumulation=accumulation, **fields)
    loop = plain_loop(head, case, batch, accumulation, **fields)
    assert_same_run(loop, trainer, learned=case == "lets-sam")


def test_plain_loop_with_adamw_equals_lets_trainer_optimizer_state_included(tmp_path, one_thread):
    settings = dict(optim="adamw_torch", learning_rate=1e-3, rho_optimizer="adam", rho_lr=0.01)
    trainer = train("bert-classification", "lets-sam", str(tmp_path), batch=GLOBAL_BATCH // 2, accumulation=2,
                    weight_decay=0.0, **settings)
    loop = plain_loop("bert-classification", "lets-sam", GLOBAL_BATCH // 2, 2, **settings)
    assert all("exp_avg_sq" in state for state in loop["optimizer_state"])
    assert_same_run(loop, trainer, learned=True)


@pytest.mark.parametrize("run", ["bert-classification/lets-sam", "bert-classification/bsam"])
def test_plain_loop_under_an_accelerator_with_accumulation_equals_lets_trainer(tmp_path, one_thread, run):
    head, case, fields = RUNS[run]
    trainer = train(head, case, str(tmp_path), batch=GLOBAL_BATCH // 2, accumulation=2, **fields)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loop = plain_loop(head, case, GLOBAL_BATCH // 2, 2, accelerator=accelerator, **fields)
    assert_same_run(loop, trainer, learned=case == "lets-sam")


@pytest.mark.parametrize("estimator", [{}, {"rho_estimator": "trace"}])
def test_engine_state_round_trips_so_a_resumed_loop_is_exact(one_thread, estimator):
    head, batch = "bert-classification", GLOBAL_BATCH
    whole = plain_loop(head, "lets-sam", batch, **estimator)
    first_two = plain_loop(head, "lets-sam", batch, steps=2, **estimator)
    resumed = plain_loop(head, "lets-sam", batch, resume=first_two["state"], **estimator)
    assert resumed["engine"].global_step == whole["engine"].global_step == 3
    assert resumed["rho"] == whole["rho"] != first_two["rho"]
    torch.testing.assert_close(resumed["theta"], whole["theta"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["engine"].radius.u, whole["engine"].radius.u, rtol=0, atol=0)


def test_a_learned_rho_without_validation_batches_is_refused():
    args = LETSArguments(sam_variant="sam", learn_rho=True)
    model = build_model("bert-classification")
    with pytest.raises(UsageError, match="needs validation data"):
        LETSEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), args, loss_fn=lambda m, b: m(**b).loss)


def test_an_optimizer_a_learned_rho_cannot_differentiate_is_refused_in_a_loop():
    args = LETSArguments(sam_variant="sam", learn_rho=True)
    model = build_model("bert-classification")
    with pytest.raises(UsageError, match="Adagrad"):
        LETSEngine(model, torch.optim.Adagrad(model.parameters(), lr=0.1), args, loss_fn=lambda m, b: m(**b).loss,
                   rho_batches=[])


@pytest.mark.parametrize(
    "sam_variant", ["none", "sam", "asam", "bsam", "lightsam-adagrad-norm", "lightsam-adagrad", "lightsam-adam"]
)
def test_every_rule_steps_in_a_loop_configured_by_lets_arguments_alone(one_thread, sam_variant):
    """`LETSArguments` has no TrainingArguments fields (e.g. `adam_beta2`, which LightSAM-Adam's rule reads)."""
    run = plain_loop("bert-classification", "sam", GLOBAL_BATCH, steps=1, sam_variant=sam_variant)
    assert run["engine"].global_step == 1
    assert not torch.equal(run["theta"], plain_loop("bert-classification", "sam", GLOBAL_BATCH, steps=0)["theta"])


def test_plain_loop_in_bf16_equals_lets_trainer_in_bf16(tmp_path, one_thread):
    """accelerate's bf16 autocast on float32 weights, in the loop as in Trainer: the same numbers."""
    head = "bert-classification"
    trainer = train(head, "lets-sam", str(tmp_path), batch=GLOBAL_BATCH, dtype=torch.float32, bf16=True)
    loop = plain_loop(head, "lets-sam", GLOBAL_BATCH, accelerator=Accelerator(cpu=True, mixed_precision="bf16"),
                      model=build_model(head).float())
    torch.testing.assert_close(loop["theta"], trainer["theta"], rtol=1e-6, atol=1e-7)
    assert loop["rho"] == pytest.approx(trainer["rho"], rel=1e-5) and abs(loop["rho"] - 0.05) > 1e-3


@pytest.mark.parametrize("sam_variant", ["sam", "bsam"])
def test_a_loss_scaled_loop_unscales_before_the_rule_and_the_rho_update(one_thread, sam_variant):
    """fp16's loss scaling through the Accelerator (a CPU `GradScaler` as the stand-in for CUDA amp, set before
    `prepare` so the optimizer unscales too): scaled and unscaled loops agree."""
    head = "bert-classification"
    scaled_accelerator = Accelerator(cpu=True)
    scaled_accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = plain_loop(head, "lets-sam", GLOBAL_BATCH, accelerator=scaled_accelerator, model=build_model(head).float(),
                        sam_variant=sam_variant)
    plain = plain_loop(head, "lets-sam", GLOBAL_BATCH, accelerator=Accelerator(cpu=True), model=build_model(head).float(),
                       sam_variant=sam_variant)
    assert scaled["engine"].grad_scaler is scaled_accelerator.scaler and scaled_accelerator.scaler.get_scale() == 2.0**10
    torch.testing.assert_close(scaled["theta"], plain["theta"], rtol=1e-5, atol=1e-6)
    assert scaled["rho"] == pytest.approx(plain["rho"], rel=1e-5) and abs(plain["rho"] - 0.05) > 1e-3
