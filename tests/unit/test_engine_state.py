"""`check_layout`: what a resume on another number of processes refuses, and what it says is (not) exact."""

import logging

import pytest

from lets_hf.engine_state import Layout, check_layout
from lets_hf.errors import UsageError

SAVED = Layout(processes=2, global_batch=32, sharded=False, sam_scope="global")


def _logged(caplog, current: Layout, dropout: bool) -> list[logging.LogRecord]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lets_hf.engine_state"):
        check_layout(SAVED, current, "out/checkpoint-10", dropout)
    return [record for record in caplog.records if record.name == "lets_hf.engine_state"]


def test_another_number_of_processes_says_what_carries_over_and_whether_dropout_breaks_exactness(caplog):
    four = Layout(processes=4, global_batch=32, sharded=False, sam_scope="global")
    (with_dropout,) = _logged(caplog, four, dropout=True)
    assert with_dropout.levelno == logging.WARNING and "not the saved run's, mask for mask" in with_dropout.message
    (without,) = _logged(caplog, four, dropout=False)
    assert without.levelno == logging.INFO and "equals the saved run up to summation order" in without.message
    assert "written on 2 process(es), on 4" in without.message
    assert _logged(caplog, SAVED, dropout=True) == []  # the same processes: nothing to say


@pytest.mark.parametrize("current, says", [
    (Layout(1, 16, False, "global"), "Set per_device_train_batch_size × 1 process(es) × gradient_accumulation_steps = 32"),
    (Layout(2, 64, False, "global"), "a global batch of 32 examples per optimizer step (2 process(es)) and this run's is 64"),
    (Layout(1, 32, False, "local"), "Resume on 2 process(es), or start a new run"),
    (Layout(2, 32, True, "global"), "it was written without FSDP2 and this run is under it"),
])
def test_a_layout_that_cannot_continue_the_run_is_refused(current, says):
    with pytest.raises(UsageError, match="Cannot resume from out/checkpoint-10") as refused:
        check_layout(SAVED, current, "out/checkpoint-10", dropout=False)
    assert says in str(refused.value)


def test_the_local_scope_resumes_on_its_own_number_of_processes():
    local = Layout(2, 32, False, "local")
    check_layout(local, local, "out/checkpoint-10", dropout=False)
